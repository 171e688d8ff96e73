//! A real QEMU VM (TCG) with one virtio-serial port whose chardev socket is a
//! channel of the proxy. Killed by PID on drop; every wait bounded.
//! Assets come from `scripts/vm-assets` (run by `scripts/test`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

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
        Self::start(dir, name, chardev, None, &[], &[])
    }

    /// Boot with more words on the kernel command line, which the guest's
    /// init reads (`tether.log=<filter>`, `tether.probe_after=<ms>`:
    /// `scripts/vm-assets`).
    pub fn boot_with_cmdline(dir: &Path, name: &str, chardev: &Path, words: &[&str]) -> Self {
        Self::start(dir, name, chardev, None, &[], words)
    }

    /// Boot with a second port, `org.tether.echo.0` at `echo`, on which the
    /// guest's init echoes whatever comes (a raw baseline, no tether).
    pub fn boot_with_echo(dir: &Path, name: &str, chardev: &Path, echo: &Path) -> Self {
        Self::start(
            dir,
            name,
            chardev,
            None,
            &[(echo, "org.tether.echo.0")],
            &[],
        )
    }

    /// Boot with more ports, each `(chardev socket, port name)`: the
    /// guest's init echoes on `org.tether.echo.0` and runs qemu-ga on
    /// `org.qemu.guest_agent.0`.
    pub fn boot_with_ports(
        dir: &Path,
        name: &str,
        chardev: &Path,
        ports: &[(&Path, &str)],
    ) -> Self {
        Self::start(dir, name, chardev, None, ports, &[])
    }

    /// A migration destination: same machine, waiting on `-incoming`.
    pub fn incoming(dir: &Path, name: &str, chardev: &Path, port: u16) -> Self {
        Self::start(dir, name, chardev, Some(port), &[], &[])
    }

    pub fn qmp_path(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}-qmp.sock"))
    }

    fn start(
        dir: &Path,
        name: &str,
        chardev: &Path,
        incoming: Option<u16>,
        ports: &[(&Path, &str)],
        cmdline: &[&str],
    ) -> Self {
        let serial = dir.join(format!("{name}-console.log"));
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.arg("-qmp").arg(format!(
            "unix:{},server=on,wait=off",
            Self::qmp_path(dir, name).display()
        ));
        if let Some(p) = incoming {
            cmd.arg("-incoming").arg(format!("tcp:127.0.0.1:{p}"));
        }
        cmd.args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-m",
            "256",
            "-accel",
            "tcg",
            "-nic",
            "none",
        ])
        .arg("-kernel")
        .arg(asset("vmlinuz"))
        .arg("-initrd")
        .arg(asset("initramfs.cpio.gz"))
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 tether.log={} {}",
            std::env::var("TETHER_VM_LOG").unwrap_or_else(|_| "info".into()),
            cmdline.join(" ")
        ))
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .args(["-device", "virtio-serial-pci,id=vser0"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=ch0,path={},server=on,wait=off",
            chardev.display()
        ))
        .args([
            "-device",
            "virtserialport,chardev=ch0,name=org.tether.agent.0,id=port0",
        ]);
        for (i, (sock, port)) in ports.iter().enumerate() {
            let n = i + 1;
            cmd.arg("-chardev")
                .arg(format!(
                    "socket,id=ch{n},path={},server=on,wait=off",
                    sock.display()
                ))
                .arg("-device")
                .arg(format!(
                    "virtserialport,chardev=ch{n},name={port},id=port{n}"
                ));
        }
        let child = cmd
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

    /// Wait (bounded) until the guest's console shows `needle`.
    pub async fn wait_console(&self, needle: &str, bound: std::time::Duration) {
        let t = std::time::Instant::now();
        while !self.console().contains(needle) {
            assert!(
                t.elapsed() < bound,
                "the console never showed {needle:?}:\n{}",
                self.console()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A QMP client (one command at a time; events are skipped).
pub struct Qmp {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
    w: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    pub async fn connect(path: &Path) -> Self {
        use tokio::io::AsyncBufReadExt;
        let t = std::time::Instant::now();
        let s = loop {
            match tokio::net::UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        t.elapsed() < std::time::Duration::from_secs(30),
                        "QMP {}: {e}",
                        path.display()
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        };
        let (r, w) = s.into_split();
        let mut q = Self {
            lines: tokio::io::BufReader::new(r).lines(),
            w,
        };
        // The greeting, bounded like every other QMP read.
        tokio::time::timeout(std::time::Duration::from_secs(30), q.lines.next_line())
            .await
            .expect("QMP sent no greeting")
            .unwrap();
        q.cmd(serde_json::json!({"execute": "qmp_capabilities"}))
            .await;
        q
    }

    pub async fn cmd(&mut self, c: serde_json::Value) -> serde_json::Value {
        use tokio::io::AsyncWriteExt;
        self.w.write_all(format!("{c}\n").as_bytes()).await.unwrap();
        loop {
            let l =
                tokio::time::timeout(std::time::Duration::from_secs(30), self.lines.next_line())
                    .await
                    .expect("QMP answered nothing")
                    .unwrap()
                    .expect("QMP closed");
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            if v.get("event").is_none() {
                return v;
            }
        }
    }
}

/// A free TCP port on loopback for a migration destination's `-incoming`.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether a socket listens on TCP `port` here, read from /proc/net/tcp and
/// tcp6 (state 0A): a probe connection would not do, QEMU would take it for
/// the migration stream.
pub fn listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.get(1).is_some_and(|a| a.ends_with(&want)) && cols.get(3) == Some(&"0A")
            })
    })
}

/// Migrate the VM whose QMP socket is `qmp` to `port`; returns how long the
/// migration took once started. Quits the source when done.
pub fn migrate_after(
    delay: Duration,
    qmp: PathBuf,
    port: u16,
) -> tokio::task::JoinHandle<Duration> {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        // A destination QEMU started under load may not listen on its
        // -incoming port yet: `migrate` would fail with "connection refused".
        let t = Instant::now();
        while !listening(port) {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the destination never listened on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut q = Qmp::connect(&qmp).await;
        let v = q
            .cmd(json!({"execute": "migrate", "arguments": {"uri": format!("tcp:127.0.0.1:{port}")}}))
            .await;
        assert!(v.get("return").is_some(), "{v}");
        let t = Instant::now();
        loop {
            let v = q.cmd(json!({"execute": "query-migrate"})).await;
            match v["return"]["status"].as_str() {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => panic!("migration {v}"),
                _ => {}
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "migration did not complete"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let took = t.elapsed();
        let _ = q.cmd(json!({"execute": "quit"})).await;
        took
    })
}
