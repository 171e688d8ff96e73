//! A domain started by a real libvirtd from `packaging/libvirt/domain.xml`:
//! QEMU creates the channel socket in the proxy's channels directory and
//! the instance links with nothing else done; stopping the domain removes
//! the socket and the link goes down.
//!
//! libvirtd (Debian 12's 9.0, no systemd) runs in a mount namespace of its
//! own with private state directories, so the test touches no system-wide
//! libvirt state and two runs never meet; it and its virtlogd are stopped
//! by PID. The guest is the test suite's small one (`scripts/vm-assets`:
//! the kernel and an initramfs with the static agent), booted by kernel:
//! the packaged domain's disks and firmware boot are swapped for that, its
//! channel element is kept as it is, with this test's uuid and directory.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

/// libvirtd's first answer waits for its probe of QEMU (7–12 s measured).
const START: Duration = Duration::from_secs(90);

struct Libvirt {
    daemon: Child,
    dir: PathBuf,
    uri: String,
}

impl Libvirt {
    fn start(dir: &Path) -> Self {
        for (d, _) in [
            ("etc", ()),
            ("run", ()),
            ("lib", ()),
            ("log/qemu", ()),
            ("cache", ()),
        ] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let st = Command::new("cp")
            .arg("-a")
            .arg("/etc/libvirt/.")
            .arg(dir.join("etc"))
            .status()
            .expect("cp");
        assert!(
            st.success(),
            "/etc/libvirt (apt-get install libvirt-daemon libvirt-daemon-driver-qemu)"
        );
        // QEMU as root (the libvirt-qemu user still has to exist: libvirt
        // resolves its default first); a host uuid of its own.
        std::fs::write(
            dir.join("etc/qemu.conf"),
            "user = \"root\"\ngroup = \"root\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("etc/libvirtd.conf"),
            format!("host_uuid = \"{}\"\n", random_uuid()),
        )
        .unwrap();
        let d = dir.display();
        let script = format!(
            "set -e
mkdir -p /etc/libvirt /run/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt
mount --bind {d}/etc /etc/libvirt
mount --bind {d}/run /run/libvirt
mount --bind {d}/lib /var/lib/libvirt
mount --bind {d}/log /var/log/libvirt
mount --bind {d}/cache /var/cache/libvirt
virtlogd --daemon --pid-file {d}/virtlogd.pid
exec libvirtd --pid-file {d}/libvirtd.pid"
        );
        let log = std::fs::File::create(dir.join("libvirtd.log")).unwrap();
        let daemon = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("unshare");
        let uri = format!("qemu+unix:///system?socket={d}/run/libvirt-sock");
        let l = Self {
            daemon,
            dir: dir.to_path_buf(),
            uri,
        };
        let t = Instant::now();
        loop {
            let out = l.virsh(&["version"]);
            if out.status.success() {
                break;
            }
            assert!(
                t.elapsed() < START,
                "libvirtd never answered: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(dir.join("libvirtd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        l
    }

    fn virsh(&self, args: &[&str]) -> std::process::Output {
        Command::new("virsh")
            .args(["-c", &self.uri])
            .args(args)
            .output()
            .expect("virsh (apt-get install libvirt-clients)")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.virsh(args);
        assert!(
            out.status.success(),
            "virsh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into()
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        // Domains first (QEMU is libvirtd's child), then the daemons.
        let _ = Command::new("virsh")
            .args(["-c", &self.uri, "destroy", "tether-libvirt-test"])
            .output();
        let pid = std::fs::read_to_string(self.dir.join("virtlogd.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// The packaged domain with this test's uuid and channels directory, booted
/// from the test kernel and initramfs (TCG), its console in a file.
fn domain_xml(uuid: &str, channels: &Path, console: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let xml = std::fs::read_to_string(root.join("packaging/libvirt/domain.xml")).unwrap();
    let packaged_uuid = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";
    let channel_dir = "/var/lib/tether/channels/";
    assert!(xml.contains(packaged_uuid) && xml.contains(channel_dir));
    let vm = root.join("target/vm");
    assert!(
        vm.join("initramfs.cpio.gz").exists(),
        "run scripts/vm-assets (scripts/test does)"
    );
    let cut = |s: &str, from: &str, to: &str, with: &str| -> String {
        let a = s
            .find(from)
            .unwrap_or_else(|| panic!("{from} not in the domain"));
        let b = s[a..].find(to).unwrap() + a + to.len();
        format!("{}{with}{}", &s[..a], &s[b..])
    };
    let mut x = xml
        .replace("<domain type='kvm'>", "<domain type='qemu'>")
        .replace(
            &format!("{channel_dir}{packaged_uuid}.sock"),
            &format!("{}/{uuid}.sock", channels.display()),
        )
        .replace(packaged_uuid, uuid)
        .replace(
            "<name>service-vm-6ba7b810</name>",
            "<name>tether-libvirt-test</name>",
        )
        .replace(
            "<on_reboot>restart</on_reboot>",
            "<on_reboot>destroy</on_reboot>",
        );
    x = cut(
        &x,
        "<os>",
        "</os>",
        &format!(
            "<os><type arch='x86_64' machine='q35'>hvm</type><kernel>{}</kernel><initrd>{}</initrd><cmdline>console=ttyS0 quiet panic=-1</cmdline></os>",
            vm.join("vmlinuz").display(),
            vm.join("initramfs.cpio.gz").display()
        ),
    );
    // No disks: the initramfs is the whole guest.
    while x.contains("<disk ") {
        x = cut(&x, "<disk ", "</disk>", "");
    }
    x = cut(
        &x,
        "<serial type='pty'>",
        "</console>",
        &format!(
            "<serial type='file'><source path='{}'/><target port='0'/></serial>",
            console.display()
        ),
    );
    x
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_started_by_libvirt_links_by_its_channel() {
    let w = World::new();
    let _proxy = w.proxy("");
    let mut ctl = w.ctl().await;
    let lv = Libvirt::start(&w.path("libvirt"));
    let uuid = random_uuid();
    let console = w.path("console.log");
    let xml = domain_xml(&uuid, &w.channels(), &console);
    let file = w.path("domain.xml");
    std::fs::write(&file, &xml).unwrap();
    let st = Command::new("virt-xml-validate")
        .arg(&file)
        .arg("domain")
        .status()
        .expect("virt-xml-validate");
    assert!(st.success(), "{xml}");
    lv.ok(&["define", file.to_str().unwrap()]);
    lv.ok(&["start", "tether-libvirt-test"]);
    // QEMU made the socket; the proxy found it and linked; the agent's
    // sub-agent answers.
    wait_linked_for(&mut ctl, &uuid, "demo", START, || {
        std::fs::read_to_string(&console).unwrap_or_default()
    })
    .await;
    let v = ctl
        .req(json!({"op": "call", "instance": uuid, "topic": "demo", "method": "echo", "args": {"x": 1}}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    // Stopping the domain removes the socket; the link goes down.
    lv.ok(&["destroy", "tether-libvirt-test"]);
    let sock = w.channels().join(format!("{uuid}.sock"));
    let t = Instant::now();
    while sock.exists() || ctl.link(&uuid).await["connected"] == true {
        assert!(t.elapsed() < START, "the channel outlived the domain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lv.ok(&["undefine", "tether-libvirt-test"]);
}
