//! The libvirt XML Ferry writes: an isolated network per subnet, a DHCP
//! host entry per NIC, and a domain per failed-over VM. Every value is
//! escaped; names come from [`super::names`].

use std::fmt::Write;
use std::net::Ipv4Addr;

use crate::inventory::{parse_cidr, Firmware, TargetVm};

/// Ferry's XML namespace in a domain's metadata.
pub const NAMESPACE: &str = "https://ferry.dev/xmlns/libvirt/1";

/// Text for an attribute or element.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The gateway (the host's bridge: the subnet's first address), its
/// netmask, and the DHCP range (the fifth address to the last but one, as
/// [`crate::inventory::assign_ip`] hands them out); None for a CIDR that
/// is not IPv4 or too small.
pub fn addressing(cidr: &str) -> Option<(Ipv4Addr, Ipv4Addr, Ipv4Addr, Ipv4Addr)> {
    let (base, len) = parse_cidr(cidr)?;
    let size = 1u64 << (32 - len);
    if size < 8 {
        return None;
    }
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    let base = u64::from(base);
    let at = |n: u64| Ipv4Addr::from((base + n) as u32);
    Some((at(1), Ipv4Addr::from(mask), at(4), at(size - 2)))
}

/// An isolated network (no forward: guests reach each other and the host's
/// bridge only) for one subnet, DHCP on.
pub fn network(name: &str, cidr: &str) -> Option<String> {
    let (gateway, mask, first, last) = addressing(cidr)?;
    Some(format!(
        "<network>\n  <name>{}</name>\n  <bridge stp='on' delay='0'/>\n  \
         <ip address='{gateway}' netmask='{mask}'>\n    <dhcp>\n      \
         <range start='{first}' end='{last}'/>\n    </dhcp>\n  </ip>\n</network>\n",
        escape(name)
    ))
}

/// The DHCP host entry that gives a NIC its address.
pub fn dhcp_host(mac: &str, ip: &str) -> String {
    format!("<host mac='{}' ip='{}'/>", escape(mac), escape(ip))
}

/// A domain for the VM: its shape, its disks (virtio, raw images or qcow2
/// overlays whose backing libvirt reads from their headers, the OS disk
/// booting first), a virtio NIC per NIC on its subnet's network, and its
/// first serial port written to its console file. `networks` names each
/// NIC's libvirt network, in the VM's NIC order.
pub fn domain(vm: &TargetVm, domain_type: &str, networks: &[String]) -> String {
    let s = &vm.shape;
    let mut x = String::new();
    let _ = writeln!(x, "<domain type='{}'>", escape(domain_type));
    let _ = writeln!(x, "  <name>{}</name>", escape(&vm.domain));
    let _ = writeln!(
        x,
        "  <title>{}</title>",
        escape(&format!(
            "{} ({}/{}), {} of {} at {}",
            vm.name,
            vm.region,
            vm.resource_group,
            if vm.test { "test failover" } else { "failover" },
            vm.source_vm,
            vm.point_id
        ))
    );
    let _ = writeln!(
        x,
        "  <metadata>\n    <ferry:vm xmlns:ferry='{NAMESPACE}' region='{}' resource-group='{}' \
         name='{}' source='{}' point='{}' job='{}' test='{}'/>\n  </metadata>",
        escape(&vm.region),
        escape(&vm.resource_group),
        escape(&vm.name),
        escape(&vm.source_vm),
        escape(&vm.point_id),
        escape(&vm.job_id),
        vm.test
    );
    let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", s.memory_mib);
    let _ = writeln!(x, "  <vcpu>{}</vcpu>", s.vcpus);
    let firmware = match s.firmware {
        Firmware::Bios => "",
        Firmware::Uefi => " firmware='efi'",
    };
    let _ = writeln!(x, "  <os{firmware}>\n    <type>hvm</type>");
    if let Some(k) = &s.kernel_boot {
        let _ = writeln!(x, "    <kernel>{}</kernel>", escape(&k.kernel));
        if let Some(initrd) = &k.initrd {
            let _ = writeln!(x, "    <initrd>{}</initrd>", escape(initrd));
        }
        let _ = writeln!(x, "    <cmdline>{}</cmdline>", escape(&k.cmdline));
    }
    let _ = writeln!(x, "  </os>\n  <features>\n    <acpi/>\n  </features>");
    let _ = writeln!(
        x,
        "  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  \
         <on_crash>destroy</on_crash>\n  <devices>"
    );
    // The OS disk boots first, else the first disk.
    let boot = vm.disks.iter().position(|d| d.os).unwrap_or_default();
    for (i, d) in vm.disks.iter().enumerate() {
        let boot = if i == boot && s.kernel_boot.is_none() {
            "\n      <boot order='1'/>"
        } else {
            ""
        };
        let _ = writeln!(
            x,
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{}'/>\n      \
             <source file='{}'/>\n      <target dev='{}' bus='virtio'/>\n      \
             <serial>{}</serial>{boot}\n    </disk>",
            d.format.name(),
            escape(&d.path.to_string_lossy()),
            disk_target(i),
            escape(&serial(&d.disk_id)),
        );
    }
    for (nic, network) in vm.nics.iter().zip(networks) {
        let mac = nic
            .mac_address
            .map(|m| format!("\n      <mac address='{m}'/>"))
            .unwrap_or_default();
        let _ = writeln!(
            x,
            "    <interface type='network'>{mac}\n      <source network='{}'/>\n      \
             <model type='virtio'/>\n    </interface>",
            escape(network)
        );
    }
    let _ = writeln!(
        x,
        "    <serial type='file'>\n      <source path='{}' append='on'/>\n      \
         <target port='0'/>\n    </serial>\n  </devices>\n</domain>",
        escape(&vm.console_path)
    );
    x
}

/// vda, vdb, ... vdz, vdaa, ...
pub fn disk_target(i: usize) -> String {
    let mut n = i;
    let mut letters = Vec::new();
    loop {
        letters.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    letters.reverse();
    format!("vd{}", String::from_utf8_lossy(&letters))
}

/// A virtio disk serial (at most 20 characters): the disk id, so the guest
/// finds each disk under /dev/disk/by-id whatever its order.
fn serial(disk_id: &str) -> String {
    disk_id.chars().take(20).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_named_as_the_kernel_names_them() {
        let names: Vec<String> = [0, 1, 25, 26, 27, 701, 702].map(disk_target).to_vec();
        assert_eq!(
            names,
            ["vda", "vdb", "vdz", "vdaa", "vdab", "vdzz", "vdaaa"]
        );
    }

    #[test]
    fn networks_reserve_the_gateway_and_hand_out_what_assign_ip_does() {
        let (gw, mask, first, last) = addressing("10.7.0.0/24").unwrap();
        assert_eq!(
            (
                gw.to_string(),
                mask.to_string(),
                first.to_string(),
                last.to_string()
            ),
            (
                "10.7.0.1".into(),
                "255.255.255.0".into(),
                "10.7.0.4".into(),
                "10.7.0.254".into()
            )
        );
        assert!(addressing("10.7.0.0/30").is_none());
        assert!(network("n", "fd00::/64").is_none());
        let xml = network("ferry.r.n'<s>", "10.7.0.0/24").unwrap();
        assert!(
            xml.contains("<name>ferry.r.n&apos;&lt;s&gt;</name>"),
            "{xml}"
        );
        assert!(!xml.contains("<forward"), "isolated: {xml}");
    }
}
