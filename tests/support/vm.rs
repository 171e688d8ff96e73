//! A real QEMU VM (TCG) with one virtio-serial port whose chardev socket is a
//! channel of the proxy. Killed by PID on drop; every wait bounded.
//! Assets come from `scripts/vm-assets` (run by `scripts/test`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct Vm {
    child: Child,
    pub serial: PathBuf,
}

fn asset(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/vm")
        .join(name);
    assert!(
        p.exists(),
        "VM asset {} is missing: run scripts/vm-assets (scripts/test does, after installing qemu-system-x86 and busybox-static)",
        p.display()
    );
    p
}

impl Vm {
    /// Boot a guest whose agent port's chardev socket is `chardev`.
    pub fn boot(dir: &Path, name: &str, chardev: &Path) -> Self {
        let serial = dir.join(format!("{name}-console.log"));
        let child = Command::new("qemu-system-x86_64")
            .args(["-display", "none", "-monitor", "none", "-no-reboot", "-m", "256", "-accel", "tcg", "-nic", "none"])
            .arg("-kernel")
            .arg(asset("vmlinuz"))
            .arg("-initrd")
            .arg(asset("initramfs.cpio.gz"))
            .args(["-append", "console=ttyS0 quiet panic=-1"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .args(["-device", "virtio-serial-pci,id=vser0"])
            .arg("-chardev")
            .arg(format!("socket,id=ch0,path={},server=on,wait=off", chardev.display()))
            .args(["-device", "virtserialport,chardev=ch0,name=org.tether.agent.0,id=port0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 is required: apt-get install -y --no-install-recommends qemu-system-x86");
        Self { child, serial }
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
