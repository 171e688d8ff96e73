//! A real Debian 12 guest (systemd, udev, cloud-init; `scripts/guest-image`)
//! under TCG, with a NoCloud seed, the tether port as a channel of the
//! proxy, and a root shell on a second virtio-serial port the test drives.
//! Killed by PID on drop; every wait bounded.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// The directory a caching script of `scripts/` prints (the test command
/// runs each first; running it here too makes a test run alone work).
fn cached_by(script: &str) -> PathBuf {
    let out = Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scripts")
            .join(script),
    )
    .stderr(Stdio::inherit())
    .output()
    .unwrap_or_else(|e| panic!("scripts/{script}: {e}"));
    assert!(out.status.success(), "scripts/{script} failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The image's directory (built and cached by `scripts/guest-image`).
pub fn image_dir() -> PathBuf {
    cached_by("guest-image")
}

/// The user-data this repository ships (`cloud-init/user-data.yaml`).
pub fn shipped_user_data() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("cloud-init/user-data.yaml"))
        .expect("cloud-init/user-data.yaml")
}

/// A built Debian package of this checkout (`scripts/package`).
pub fn deb(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("target/debian/{name}_0.1.0-1_amd64.deb"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/package",
        p.display()
    );
    p
}

/// A NoCloud seed (volume `cidata`) with `user-data`, a `meta-data` for
/// `instance`, and `extra` files (packages) beside them.
pub fn seed(dir: &Path, instance: &str, user_data: &str, extra: &[PathBuf]) -> PathBuf {
    let src = dir.join("seed");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("user-data"), user_data).unwrap();
    std::fs::write(
        src.join("meta-data"),
        format!("instance-id: {instance}\nlocal-hostname: tether-guest\n"),
    )
    .unwrap();
    for f in extra {
        std::fs::copy(f, src.join(f.file_name().unwrap())).unwrap();
    }
    let iso = dir.join("seed.iso");
    let st = Command::new("genisoimage")
        .args(["-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"])
        .arg(&iso)
        .arg(&src)
        .status()
        .expect("genisoimage (apt-get install genisoimage)");
    assert!(st.success());
    iso
}

/// Where cloud-init writes the guest's oslo program, and what it records.
pub const OSLO_PROGRAM: &str = "/usr/local/lib/lbaas-agent/agent.py";
pub const OSLO_RECORD: &str = "/run/lbaas-record.jsonl";

/// The shipped user-data, as an operator adapts it (its comment says so):
/// cloud-init also writes the guest's oslo program and the agent starts it
/// as a second sub-agent, on `tether:///run/tether/agent.sock`.
pub fn user_data_with_oslo_program(shipped: &str, notify_topic: &str) -> String {
    let program = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/tests/guest_oslo_program.py"),
    )
    .unwrap();
    let mut file = format!(
        "write_files:\n  - path: {OSLO_PROGRAM}\n    owner: root:root\n    permissions: \"0755\"\n    content: |\n"
    );
    for l in program.lines() {
        file.push_str(&format!("      {l}\n").replace("      \n", "\n"));
    }
    let restart = "      restart = \"always\"\n";
    let subagent = format!(
        "{restart}      [[subagents]]\n      name = \"lbaas\"\n      argv = [\"/usr/bin/python3\", \"{OSLO_PROGRAM}\", \
         \"tether:///run/tether/agent.sock\", \"lbaas\", \"lbaas-plugin\", \"{OSLO_RECORD}\", \"{notify_topic}\"]\n{restart}"
    );
    assert_eq!(shipped.matches("write_files:\n").count(), 1);
    assert_eq!(shipped.matches(restart).count(), 1);
    shipped
        .replacen("write_files:\n", &file, 1)
        .replacen(restart, &subagent, 1)
}

pub struct ImageVm {
    child: Child,
    pub console: PathBuf,
    shell: PathBuf,
}

/// What QEMU and which disk an image VM runs with (see [`ImageVm::boot`]
/// for the plain case).
pub struct ImageOpts<'a> {
    /// A name for its files in the test's directory (console, shell, QMP).
    pub name: &'a str,
    /// The QEMU to run: `None` for the system's; `Some(dir)` for one
    /// unpacked by `scripts/qemu10` into `dir`.
    pub qemu: Option<&'a Path>,
    /// The root disk: `None` for the image itself behind a throw-away
    /// snapshot; `Some(file)` for a qcow2 overlay of it that two QEMUs of
    /// a migration share ([`overlay`]).
    pub disk: Option<&'a Path>,
    /// Wait for a migration on this loopback port instead of booting.
    pub incoming: Option<u16>,
}

/// A qcow2 overlay of the image's root disk in `dir`, for a VM that
/// migrates (both QEMUs open the same file; the source hands it over),
/// made by the `qemu-img` unpacked in `qemu` ([`qemu10_dir`]).
pub fn overlay(dir: &Path, image: &Path, qemu: &Path) -> PathBuf {
    let f = dir.join("root-overlay.qcow2");
    let st = Command::new(qemu.join("usr/bin/qemu-img"))
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(image.join("base.raw"))
        .arg(&f)
        .status()
        .expect("qemu-img (scripts/qemu10 unpacks it)");
    assert!(st.success(), "qemu-img create failed");
    f
}

/// QEMU 10 from bookworm-backports, unpacked by `scripts/qemu10`.
pub fn qemu10_dir() -> PathBuf {
    cached_by("qemu10")
}

impl ImageVm {
    /// Boot the image (writes go to a throw-away snapshot) with `seed`,
    /// the tether port's chardev at `channel`.
    pub fn boot(dir: &Path, image: &Path, seed: &Path, channel: &Path) -> Self {
        Self::start(
            dir,
            image,
            seed,
            channel,
            &ImageOpts {
                name: "image",
                qemu: None,
                disk: None,
                incoming: None,
            },
        )
    }

    /// Start the image as `opts` say; its QMP socket is [`Self::qmp`].
    pub fn start(dir: &Path, image: &Path, seed: &Path, channel: &Path, opts: &ImageOpts) -> Self {
        let console = dir.join(format!("{}-console.log", opts.name));
        let shell = dir.join(format!("{}-shell.sock", opts.name));
        let mut cmd = match opts.qemu {
            None => Command::new("qemu-system-x86_64"),
            Some(q) => {
                let mut c = Command::new(q.join("usr/bin/qemu-system-x86_64"));
                c.arg("-L")
                    .arg(q.join("usr/share/qemu"))
                    .arg("-L")
                    .arg(q.join("usr/share/seabios"))
                    .env("QEMU_MODULE_DIR", q.join("usr/lib/x86_64-linux-gnu/qemu"));
                c
            }
        };
        cmd.args(["-machine", "q35", "-accel", "tcg", "-m", "512", "-smp", "1"])
            .args([
                "-display",
                "none",
                "-monitor",
                "none",
                "-no-reboot",
                "-nic",
                "none",
            ])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                Self::qmp(dir, opts.name).display()
            ))
            .arg("-kernel")
            .arg(image.join("vmlinuz"))
            .arg("-initrd")
            .arg(image.join("initrd.img"))
            .args([
                "-append",
                "root=LABEL=tether-root rw console=ttyS0 panic=-1",
            ])
            .arg("-drive")
            .arg(match opts.disk {
                None => format!(
                    "file={},if=virtio,format=raw,snapshot=on",
                    image.join("base.raw").display()
                ),
                Some(d) => format!("file={},if=virtio,format=qcow2", d.display()),
            })
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,readonly=on",
                seed.display()
            ))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .args(["-device", "virtio-serial-pci,id=vser0"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=ch0,path={},server=on,wait=off",
                channel.display()
            ))
            .args([
                "-device",
                "virtserialport,chardev=ch0,name=org.tether.agent.0,id=port0",
            ])
            .arg("-chardev")
            .arg(format!(
                "socket,id=ch1,path={},server=on,wait=off",
                shell.display()
            ))
            .args([
                "-device",
                "virtserialport,chardev=ch1,name=org.tether.shell.0,id=port1",
            ]);
        if let Some(port) = opts.incoming {
            cmd.arg("-incoming").arg(format!("tcp:127.0.0.1:{port}"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 is required: apt-get install -y --no-install-recommends qemu-system-x86");
        Self {
            child,
            console,
            shell,
        }
    }

    /// The QMP socket of the VM named `name` in `dir`.
    pub fn qmp(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}-qmp.sock"))
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// The guest's root shell (waits, bounded, until the guest runs it).
    pub async fn shell(&self, bound: Duration) -> Shell {
        let t = Instant::now();
        let s = loop {
            if let Ok(s) = tokio::net::UnixStream::connect(&self.shell).await {
                break s;
            }
            assert!(t.elapsed() < bound, "no QEMU shell socket");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (r, w) = s.into_split();
        let mut sh = Shell {
            lines: tokio::io::BufReader::new(r).lines(),
            w,
            n: 0,
        };
        // The shell starts once systemd has booted far enough: ask until
        // it answers.
        loop {
            let left = bound.saturating_sub(t.elapsed());
            assert!(
                !left.is_zero(),
                "the guest's shell never answered:\n{}",
                self.console()
            );
            if let Ok(out) =
                tokio::time::timeout(Duration::from_secs(5).min(left), sh.run_inner("echo ready"))
                    .await
            {
                // Earlier tries, read late, may come first.
                if out.0 == 0 && out.1.ends_with("ready") {
                    return sh;
                }
            }
        }
    }
}

impl Drop for ImageVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long [`Shell::ok`] lets a command take: a hang detector. A TCG
/// guest on a machine running two more suites and two CPU hogs finished
/// cloud-init in 322 s (41 s quiet) and took over 60 s to `dpkg -i` the
/// proxy's package.
pub const OK_BOUND: Duration = Duration::from_secs(180);

/// A root shell in the guest.
pub struct Shell {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
    w: tokio::net::unix::OwnedWriteHalf,
    n: u64,
}

impl Shell {
    async fn run_inner(&mut self, cmd: &str) -> (i32, String) {
        self.n += 1;
        let end = format!("__tether_end_{}__", self.n);
        let line = format!("{cmd}\necho {end} $?\n");
        self.w.write_all(line.as_bytes()).await.unwrap();
        let mut out = vec![];
        loop {
            let l = self
                .lines
                .next_line()
                .await
                .unwrap()
                .expect("the guest's shell ended");
            if let Some(rc) = l.strip_prefix(&format!("{end} ")) {
                return (rc.trim().parse().unwrap_or(-1), out.join("\n"));
            }
            out.push(l);
        }
    }

    /// Run `cmd` (bounded by `bound`): its exit status and output.
    pub async fn run_for(&mut self, cmd: &str, bound: Duration) -> (i32, String) {
        tokio::time::timeout(bound, self.run_inner(cmd))
            .await
            .unwrap_or_else(|_| panic!("`{cmd}` in the guest took over {bound:?}"))
    }

    /// The complete lines of a file in the guest that a process there may
    /// be appending to (see `support::jsonl`): `cat` then `echo`, so the
    /// last line of the output is either empty (the file ended with a
    /// newline) or a line still being written — dropped either way; and
    /// the shell's end marker always starts a line of its own.
    pub async fn complete_lines(&mut self, path: &str, bound: Duration) -> Vec<String> {
        let (_, out) = self.run_for(&format!("cat {path}; echo"), bound).await;
        let mut lines: Vec<String> = out.split('\n').map(String::from).collect();
        lines.pop();
        lines
    }

    /// Run `cmd` (within [`OK_BOUND`]), which must succeed; its output.
    pub async fn ok(&mut self, cmd: &str) -> String {
        let (rc, out) = self.run_for(cmd, OK_BOUND).await;
        assert_eq!(rc, 0, "`{cmd}` in the guest: {out}");
        out
    }

    /// `systemctl show -p PROP --value UNIT`.
    pub async fn prop(&mut self, unit: &str, prop: &str) -> String {
        self.ok(&format!("systemctl show -p {prop} --value {unit}"))
            .await
    }

    /// Wait (bounded) until `cmd`'s output is `want`.
    pub async fn until(&mut self, cmd: &str, want: &str, bound: Duration) {
        let t = Instant::now();
        loop {
            let (_, out) = self.run_for(cmd, bound).await;
            if out.trim() == want {
                return;
            }
            assert!(t.elapsed() < bound, "`{cmd}` said {out:?}, not {want:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
