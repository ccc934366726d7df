use clap::Parser;
use strata::cli::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Two TLS crypto providers are linked in (aws-sdk's and kube's): choose one for the process,
    // or rustls refuses to guess when the first TLS client is built.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    strata::telemetry::init_logging(cli.log_format, &cli.log_level);
    match cli.command {
        Command::Controller(args) => {
            strata::service::run_controller(args, strata::service::shutdown_on_signal()).await?
        }
        Command::Node(args) => strata::service::run_node(args, strata::service::shutdown_on_signal()).await?,
        Command::Demo(args) => strata::demo::run(args).await?,
        Command::Snapshot(cmd) => strata::admin::snapshot(cmd).await?,
        Command::Restore(args) => strata::admin::restore(args).await?,
        Command::Verify(args) => strata::admin::verify(args).await?,
        Command::Gc(args) => strata::admin::gc(args).await?,
        Command::Bench(args) => strata::bench::run(args).await?,
        Command::BenchController(args) => strata::bench_controller::run(args).await?,
        Command::WaitReady(args) => strata::kube::rollout::run(args).await?,
        Command::Fsr(cmd) => strata::admin::fsr(cmd).await?,
        Command::Key(cmd) => strata::admin::key(cmd).await?,
        Command::Volume(cmd) => strata::admin_volume::volume(cmd)?,
        Command::Hydrate(args) => strata::hydrate::serve::run(args).await?,
    }
    Ok(())
}
