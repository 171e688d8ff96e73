//! tether-agent: the super-agent inside the VM.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tether::guest::config::AgentConfig;

/// The tether super-agent: owns the virtio-serial port, routes RPC to
/// sub-agents and supervises them.
#[derive(Parser)]
#[command(name = "tether-agent", version)]
struct Args {
    /// Config file (TOML); defaults apply without one.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Check the config file and exit (for ExecStartPre).
    #[arg(long)]
    check_config: bool,
    /// Override the port (a device path, or unix-listen:PATH).
    #[arg(long)]
    port: Option<String>,
    /// Override the sub-agent socket path.
    #[arg(long)]
    subagent_socket: Option<PathBuf>,
    /// Override the state directory (the journal of taken requests).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Log format: text lines, or one JSON object per line.
    #[arg(long, value_enum, env = "TETHER_LOG_FORMAT", default_value_t)]
    log_format: tether::daemon::LogFormat,
    /// Print the manual page (roff) and exit (for packaging).
    #[arg(long, hide = true)]
    man: bool,
}

fn load(args: &Args) -> anyhow::Result<AgentConfig> {
    let mut cfg = match &args.config {
        Some(p) => AgentConfig::load(p)?,
        None => AgentConfig::default(),
    };
    if let Some(p) = &args.port {
        cfg.port = p.clone();
    }
    if let Some(s) = &args.subagent_socket {
        cfg.subagent_socket = s.clone();
    }
    if let Some(s) = &args.state_dir {
        cfg.state_dir = s.clone();
    }
    Ok(cfg)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.man {
        use clap::CommandFactory;
        return Ok(tether::daemon::print_man(Args::command())?);
    }
    tether::daemon::init_logging("info", args.log_format);
    let cfg = load(&args)?;
    if args.check_config {
        println!("config ok");
        return Ok(());
    }
    let rt = tether::daemon::agent_runtime().context("cannot start the runtime")?;
    rt.block_on(async {
        // SIGHUP: re-read and validate the config file; a bad file is
        // reported and the running config stays.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot install the SIGHUP handler")?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                // RELOADING=1 now; READY=1 once applied (by the agent) or
                // refused (here).
                tether::sd::reloading();
                match load(&args) {
                    Ok(c) => {
                        let _ = tx.send(c).await;
                    }
                    Err(e) => {
                        tracing::error!("config reload refused, keeping the running config: {e:#}");
                        tether::sd::reloaded();
                    }
                }
            }
        });
        // The agent runs as a task, not as the future block_on polls: on a
        // current-thread runtime, waking that future goes through the
        // driver (an eventfd write and one more epoll_wait per request the
        // link hands the router); waking a task is a push on its queue.
        tokio::spawn(tether::guest::run(cfg, tether::daemon::terminated(), rx))
            .await
            .context("the agent's task failed")??;
        anyhow::Ok(())
    })?;
    Ok(())
}
