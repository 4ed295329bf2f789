"""Build: image definitions, rootfs composition, and outputs (OCI, SBOM, manifest)."""
