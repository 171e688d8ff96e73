//! tether-proxy: the host side, one link per VM channel socket.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tether::host::config::ProxyConfig;
use tether::host::policy::PolicyStore;

/// mimalloc rather than glibc's malloc: the enforcement point allocates and
/// frees a few small strings per guest message (the parsed envelope, its
/// audit record, the refusal), and under a guest's flood of them glibc's
/// allocator was the largest single cost (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The tether host proxy: links every VM whose chardev socket is in the
/// channels directory and serves the control socket.
#[derive(Parser)]
#[command(name = "tether-proxy", version)]
struct Args {
    /// Config file (TOML); defaults apply without one.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Check the config file and exit (for ExecStartPre).
    #[arg(long)]
    check_config: bool,
    /// Override the channels directory.
    #[arg(long)]
    channels_dir: Option<PathBuf>,
    /// Override the control socket path.
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Log format: text lines, or one JSON object per line.
    #[arg(long, value_enum, env = "TETHER_LOG_FORMAT", default_value_t)]
    log_format: tether::daemon::LogFormat,
    /// Print the manual page (roff) and exit (for packaging).
    #[arg(long, hide = true)]
    man: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.man {
        use clap::CommandFactory;
        return Ok(tether::daemon::print_man(Args::command())?);
    }
    tether::daemon::init_logging("info", args.log_format);
    let mut cfg = match &args.config {
        Some(p) => ProxyConfig::load(p)?,
        None => ProxyConfig::default(),
    };
    if let Some(d) = args.channels_dir {
        cfg.channels_dir = d;
    }
    if let Some(s) = args.control_socket {
        cfg.control_socket = s;
    }
    if args.check_config {
        // Profiles were validated with the file; keys and assignments too.
        let store = PolicyStore::load(&cfg.policy, &cfg.broker.control_exchange)?;
        let n = store.check_all()?;
        println!(
            "config ok: {} profiles, {n} instance assignments, reply handles {}",
            cfg.policy.profiles().len(),
            if store.sealer.enabled() {
                "sealed"
            } else {
                "off (no reply_keys)"
            }
        );
        return Ok(());
    }
    let rt = tether::daemon::runtime().context("cannot start the runtime")?;
    rt.block_on(async {
        let reload = tether::daemon::hangups();
        tether::host::run(cfg, args.config, tether::daemon::terminated(), reload).await
    })?;
    Ok(())
}
