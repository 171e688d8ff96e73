//! The shipping artefacts, each checked by its own tool: the systemd units
//! (`systemd-analyze verify`, and the proxy's hardening score), the
//! cloud-init files (`cloud-init schema`), the libvirt domain
//! (`virt-xml-validate`), the Debian packages (`lintian`, their contents).
//! The packages are built by `scripts/package` (the test command runs it
//! first). Booting them is `tests/image.rs`.
//!
//! A missing tool fails the test (the test command installs them).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Run `cmd`, which must exist; its status, stdout and stderr.
fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (scripts/test installs it): {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// The units with their `ExecStart=` pointing at this build's binaries
/// (verify checks that each command exists), under their own names.
fn units_here(dir: &Path) -> Vec<PathBuf> {
    let bins = root().join("target/debug");
    let mut out = vec![];
    for u in [
        "packaging/agent/tether-agent.service",
        "packaging/proxy/tether-proxy.service",
    ] {
        let text = std::fs::read_to_string(root().join(u)).unwrap();
        let text = text.replace("/usr/bin/tether-", &format!("{}/tether-", bins.display()));
        let p = dir.join(Path::new(u).file_name().unwrap());
        std::fs::write(&p, text).unwrap();
        out.push(p);
    }
    out
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let units = units_here(dir.path());
    let (ok, out, err) = run(Command::new("systemd-analyze").arg("verify").args(&units));
    assert!(ok && out.is_empty() && err.is_empty(), "{out}{err}");
}

/// The proxy's unit keeps its hardening: `systemd-analyze security` rates
/// it 2.2 ("OK"); a change that loosens it shows here.
#[test]
fn the_proxy_unit_stays_hardened() {
    let dir = tempfile::tempdir().unwrap();
    let units = units_here(dir.path());
    let (_, out, err) = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&units[1]));
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no score: {out}{err}"));
    let score: f64 = line
        .split("tether-proxy.service: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(score <= 2.5, "{line}");
}

#[test]
fn the_cloud_init_files_pass_the_schema() {
    for f in ["cloud-init/user-data.yaml", "cloud-init/vendor-data.yaml"] {
        let (ok, out, err) = run(Command::new("cloud-init")
            .args(["schema", "--config-file"])
            .arg(root().join(f)));
        assert!(ok && out.contains("Valid cloud-config"), "{f}: {out}{err}");
    }
}

#[test]
fn the_libvirt_domain_validates_and_carries_the_channel() {
    let domain = root().join("packaging/libvirt/domain.xml");
    let (ok, out, err) = run(Command::new("virt-xml-validate").arg(&domain).arg("domain"));
    assert!(ok, "{out}{err}");
    // The channel element documented on its own is the domain's.
    let strip = |s: &str| -> String {
        let mut t = s.to_string();
        while let (Some(a), Some(b)) = (t.find("<!--"), t.find("-->")) {
            t.replace_range(a..b + 3, "");
        }
        t.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    let channel =
        strip(&std::fs::read_to_string(root().join("packaging/libvirt/channel.xml")).unwrap());
    let domain = strip(&std::fs::read_to_string(&domain).unwrap());
    assert!(channel.starts_with("<channel type='unix'>"), "{channel}");
    assert!(
        domain.contains(&channel),
        "the domain's channel differs:\n{channel}"
    );
}

/// Whether an ELF64 little-endian executable has a PT_INTERP program
/// header (asks for a dynamic loader).
fn has_interpreter(elf: &[u8]) -> bool {
    let u = |at: usize, n: usize| -> usize {
        elf[at..at + n]
            .iter()
            .rev()
            .fold(0usize, |a, b| (a << 8) | *b as usize)
    };
    assert_eq!(&elf[..4], b"\x7fELF");
    let (phoff, phentsize, phnum) = (u(0x20, 8), u(0x36, 2), u(0x38, 2));
    (0..phnum).any(|i| u(phoff + i * phentsize, 4) == 3)
}

/// Unpack the package `name` into `into` (`dpkg-deb -x`).
fn extract(name: &str, into: &Path) {
    let (ok, _, err) = run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(package(name))
        .arg(into));
    assert!(ok, "{err}");
}

fn package(name: &str) -> PathBuf {
    let p = root().join(format!("target/debian/{name}_0.1.0-1_amd64.deb"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/package",
        p.display()
    );
    p
}

#[test]
fn the_packages_are_lintian_clean() {
    for name in ["tether-agent", "tether-proxy"] {
        // Every remaining tag is overridden with its reason
        // (packaging/lintian/).
        let (ok, out, err) = run(Command::new("lintian")
            .args(["--tag-display-limit", "0", "--fail-on", "error,warning"])
            .arg(package(name)));
        let tags: Vec<&str> = out
            .lines()
            .chain(err.lines())
            .filter(|l| l.contains(": "))
            .collect();
        assert!(ok && tags.is_empty(), "{name}: {tags:#?}");
    }
}

#[test]
fn the_packages_install_where_debian_expects() {
    let files = |name: &str| {
        let (ok, out, err) = run(Command::new("dpkg-deb").arg("-c").arg(package(name)));
        assert!(ok, "{err}");
        out.lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .map(|p| p.trim_start_matches('.').to_string())
            .collect::<Vec<_>>()
    };
    let agent = files("tether-agent");
    for p in [
        "/usr/bin/tether-agent",
        "/usr/lib/systemd/system/tether-agent.service",
        "/usr/lib/udev/rules.d/60-tether-agent.rules",
        "/usr/lib/tmpfiles.d/tether-agent.conf",
        "/etc/tether/agent.toml",
        "/usr/share/tether/examples/subagent.py",
        "/usr/lib/python3/dist-packages/tether/__init__.py",
        "/usr/lib/python3/dist-packages/tether/client.py",
        "/usr/lib/python3/dist-packages/tether/aio.py",
        "/usr/lib/python3/dist-packages/tether/oslo_driver.py",
        "/usr/lib/python3/dist-packages/tether_client-0.1.0.dist-info/entry_points.txt",
        "/usr/share/man/man8/tether-agent.8.gz",
    ] {
        assert!(
            agent.iter().any(|f| f == p),
            "tether-agent lacks {p}: {agent:#?}"
        );
    }
    let proxy = files("tether-proxy");
    for p in [
        "/usr/bin/tether-proxy",
        "/usr/bin/tetherctl",
        "/usr/lib/systemd/system/tether-proxy.service",
        "/usr/lib/sysusers.d/tether.conf",
        "/usr/lib/tmpfiles.d/tether-proxy.conf",
        "/etc/tether/proxy.toml",
        "/usr/share/man/man8/tether-proxy.8.gz",
        "/usr/share/man/man1/tetherctl.1.gz",
        "/usr/share/man/man1/tetherctl-restart-agent.1.gz",
        "/usr/share/bash-completion/completions/tetherctl",
        "/usr/share/zsh/vendor-completions/_tetherctl",
        "/usr/share/fish/vendor_completions.d/tetherctl.fish",
    ] {
        assert!(
            proxy.iter().any(|f| f == p),
            "tether-proxy lacks {p}: {proxy:#?}"
        );
    }
    // The agent is static: it runs in any image, whatever its libc.
    let dir = tempfile::tempdir().unwrap();
    extract("tether-agent", dir.path());
    let elf = std::fs::read(dir.path().join("usr/bin/tether-agent")).unwrap();
    assert!(
        !has_interpreter(&elf),
        "the packaged agent asks for a dynamic loader"
    );
    assert!(has_interpreter(
        &std::fs::read(root().join("target/debug/tether-proxy")).unwrap()
    ));
    // Its own config passes its own check.
    let (ok, out, err) = run(Command::new(dir.path().join("usr/bin/tether-agent"))
        .args(["--check-config", "-c"])
        .arg(dir.path().join("etc/tether/agent.toml")));
    assert!(ok, "{out}{err}");
    extract("tether-proxy", dir.path());
    let (ok, out, err) = run(Command::new(dir.path().join("usr/bin/tether-proxy"))
        .args(["--check-config", "-c"])
        .arg(dir.path().join("etc/tether/proxy.toml")));
    assert!(ok, "{out}{err}");
}

/// The packaged Python library imports with the system's python3 alone (no
/// pip, no repository on the path), and oslo.messaging would find its
/// driver: the `tether` entry point of `oslo.messaging.drivers` is in the
/// shipped metadata, whose version is the Python project's.
#[test]
fn the_packaged_python_library_imports_and_registers_the_oslo_driver() {
    let dir = tempfile::tempdir().unwrap();
    extract("tether-agent", dir.path());
    let site = dir.path().join("usr/lib/python3/dist-packages");
    let probe = [
        "import importlib.metadata as m",
        "import tether, tether.client, tether.aio, tether._protocol",
        "eps = [e for e in m.entry_points(group='oslo.messaging.drivers') if e.name == 'tether']",
        "assert [e.value for e in eps] == ['tether.oslo_driver:TetherDriver'], eps",
        "print(m.version('tether-client'), tether.__file__)",
    ]
    .join("\n");
    // -S: no site directories, so no other copy can answer; the extracted
    // tree is the only place tether and its metadata can come from.
    let (ok, out, err) = run(Command::new("/usr/bin/python3").args([
        "-S",
        "-c",
        &format!(
            "import sys; sys.path.insert(0, {:?})\n{probe}",
            site.display().to_string()
        ),
    ]));
    assert!(ok, "{out}{err}");
    let pyproject = std::fs::read_to_string(root().join("python/pyproject.toml")).unwrap();
    let version = out.split_whitespace().next().unwrap_or_default();
    assert!(
        pyproject.contains(&format!("version = \"{version}\"")),
        "packaging/python metadata says {version}; python/pyproject.toml says otherwise"
    );
    assert!(
        out.contains(&site.display().to_string()),
        "imported another copy of tether: {out}"
    );
}

/// The packaged manual pages render without warnings (`man --warnings`,
/// as lintian runs it) and say what they should; the packaged bash
/// completion registers itself and completes tetherctl's subcommands.
#[test]
fn the_manual_pages_render_and_the_completion_completes() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["tether-agent", "tether-proxy"] {
        extract(name, dir.path());
    }
    for (page, want) in [
        ("man8/tether-agent.8.gz", "--check-config"),
        ("man8/tether-proxy.8.gz", "--log-format"),
        ("man1/tetherctl.1.gz", "Exit codes"),
        ("man1/tetherctl-restart-agent.1.gz", "Restart a sub-agent"),
    ] {
        let path = dir.path().join("usr/share/man").join(page);
        let (ok, out, err) = run(Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l"])
            .arg(&path)
            .env("MANWIDTH", "80")
            .env_remove("MAN_KEEP_FORMATTING"));
        assert!(ok && err.trim().is_empty(), "{page}: {err}");
        // man renders hyphens as U+2010 in UTF-8: compare without them.
        let plain = out.replace('\u{2010}', "-");
        assert!(plain.contains(want), "{page} lacks {want:?}: {plain}");
    }
    let script = dir
        .path()
        .join("usr/share/bash-completion/completions/tetherctl");
    let (ok, out, err) = run(Command::new("bash").arg("-c").arg(format!(
        "source {}; COMP_WORDS=(tetherctl rest); COMP_CWORD=1; COMP_LINE='tetherctl rest'; COMP_POINT=14; \
         _tetherctl tetherctl rest tetherctl; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display()
    )));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "restart-agent", "{out}{err}");
}
