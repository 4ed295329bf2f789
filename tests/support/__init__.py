"""Helpers shared by more than one test tier (unit, integration, fleet, vm).

Fixtures stay in each tier's conftest.py; what they and the tests build on lives
here, once: a real fleet server on loopback (:mod:`.fleet_server`), small OCI
layouts made in process (:mod:`.oci_layouts`), synthetic .deb files
(:mod:`.debfactory`), OpenPGP test keys (:mod:`.openpgp`) and a signed local
stand-in for the real trixie-security suite (:mod:`.security_archive`).
"""
