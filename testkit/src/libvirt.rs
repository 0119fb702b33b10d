//! libvirt on this machine for tests and benchmarks: `qemu:///system`,
//! its daemons started when they are not running (scripts/test.sh installs
//! them; they run as root).

use std::process::Command;
use std::time::{Duration, Instant};

/// The hypervisor the tests fail over onto.
pub const URI: &str = "qemu:///system";

/// `virsh -q -c URI args`: its output, or what it said on failure.
pub fn try_virsh(args: &[&str]) -> Result<String, String> {
    let out = Command::new("virsh")
        .args(["-q", "-c", URI])
        .args(args)
        .output()
        .map_err(|e| format!("virsh: {e} (scripts/test.sh installs libvirt-clients)"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `virsh -q -c URI args`, which must succeed.
pub fn virsh(args: &[&str]) -> String {
    try_virsh(args).unwrap_or_else(|e| panic!("virsh {args:?}: {e}"))
}

/// Names virsh lists (`list --all --name`, `net-list --all --name`).
pub fn names(args: &[&str]) -> Vec<String> {
    virsh(args)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// libvirtd answers on URI: virtlogd and libvirtd are started (as
/// daemons) unless it already does. /dev/kvm, where there is one, is
/// root:kvm 0660 as Debian's udev rules make it: a /dev/kvm that QEMU
/// probed as root but libvirt's QEMU user cannot open makes libvirtd
/// throw its capabilities away and probe QEMU again (about 30 s) on every
/// call. Tests of one binary run in parallel and may all call this at
/// once: a lock makes one of them start the daemons (a second
/// `virtlogd -d` fails, since the first holds its pidfile).
pub fn daemons() {
    static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = STARTING.lock().unwrap_or_else(|e| e.into_inner());
    kvm_device();
    if try_virsh(&["version"]).is_ok() {
        return;
    }
    for daemon in ["virtlogd", "libvirtd"] {
        if running(daemon) {
            continue;
        }
        let status = Command::new(daemon).arg("-d").status().unwrap_or_else(|e| {
            panic!("{daemon}: {e} (scripts/test.sh installs libvirt-daemon-system)")
        });
        assert!(status.success(), "{daemon} -d: {status}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match try_virsh(&["version"]) {
            Ok(_) => return,
            Err(e) if Instant::now() > deadline => panic!("libvirtd does not answer: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Whether a process named `name` runs (`pgrep -x`).
fn running(name: &str) -> bool {
    Command::new("pgrep")
        .args(["-x", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds the tiny guest of scripts/guest.sh into `out` (vmlinuz,
/// initrd.gz; kept while the script is unchanged).
pub fn build_guest(out: &std::path::Path) -> Result<(), String> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/guest.sh");
    let built = Command::new("bash")
        .arg(script)
        .arg(out)
        .output()
        .map_err(|e| format!("bash scripts/guest.sh: {e}"))?;
    if !built.status.success() {
        return Err(format!(
            "scripts/guest.sh: {}{}",
            String::from_utf8_lossy(&built.stdout),
            String::from_utf8_lossy(&built.stderr)
        ));
    }
    Ok(())
}

/// Removes the domains and networks named `prefix*` that an earlier run
/// left (it was killed before its cleanup).
pub fn forget(prefix: &str) {
    for d in names(&["list", "--all", "--name"]) {
        if d.starts_with(prefix) {
            let _ = try_virsh(&["destroy", &d]);
            let _ = try_virsh(&["undefine", "--nvram", &d]);
        }
    }
    for n in names(&["net-list", "--all", "--name"]) {
        if n.starts_with(prefix) {
            let _ = try_virsh(&["net-destroy", &n]);
            let _ = try_virsh(&["net-undefine", &n]);
        }
    }
}

fn kvm_device() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let kvm = std::path::Path::new("/dev/kvm");
    let Ok(meta) = kvm.metadata() else { return };
    let Some(group) = std::fs::read_to_string("/etc/group")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("kvm:")?
                .split(':')
                .nth(1)?
                .parse::<u32>()
                .ok()
        })
    else {
        return;
    };
    if meta.gid() != group || meta.mode() & 0o060 != 0o060 {
        let status = Command::new("chgrp").arg("kvm").arg(kvm).status();
        assert!(status.is_ok_and(|s| s.success()), "chgrp kvm /dev/kvm");
        std::fs::set_permissions(kvm, std::fs::Permissions::from_mode(0o660)).unwrap();
    }
}
