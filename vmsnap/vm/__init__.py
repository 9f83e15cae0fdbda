"""Machines and their channels: QMP, the guest agent, freezing with a guaranteed thaw, bare QEMU, powered-off
images and libvirt domains. Knows no repository and no strategy."""
