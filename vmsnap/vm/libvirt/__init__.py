"""libvirt domains: a :class:`~vmsnap.vm.libvirt.machine.LibvirtMachine` (QMP and agent through libvirt's
passthrough), libvirt-native snapshots and backups, and domain definitions kept with backups. Importing this
package does not import libvirt; its modules do."""
