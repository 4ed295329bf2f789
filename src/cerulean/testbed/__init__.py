"""The QEMU testbed: boot Cerulean disk images in a throwaway VM and check they come up healthy.

- :mod:`.arch`    what differs per architecture (QEMU binary, machine, UEFI firmware)
- :mod:`.accel`   KVM or TCG, decided by a short probe that is cached per process
- :mod:`.disk`    a disk image's format, GPT and architecture, without booting it
- :mod:`.console` reading the serial console: the READY report and failure patterns
- :mod:`.checks`  the named pass/fail checks a test run reports
- :mod:`.qemu`    the QEMU command line, interactive boots and test runs

The disk under test is never written: QEMU always runs on a qcow2 overlay and a
copy of the firmware's variable store, both in a temporary directory.
"""
