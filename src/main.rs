//! `watchqd`, the daemon.

use std::process::ExitCode;

use clap::Parser;
use watchqd::cli::daemon::Args;

fn main() -> ExitCode {
    // The key watch helper: this binary re-executed to act with a subscriber's
    // credentials; it must run before any thread starts.
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(watchqd::source::keys::helper::HELPER_ARG) {
        return watchqd::source::keys::helper::helper_main(&argv[2..]);
    }
    let args = Args::parse();
    watchqd::logging::init(&args.log_level);
    // Before the runtime's threads start: this clears the activation variables.
    if let Err(e) = watchqd::activation::take_passed_sockets() {
        eprintln!("watchqd: the sockets systemd passed are not what watchqd.socket declares: {e}");
        return ExitCode::from(78); // EX_CONFIG
    }
    let config = match watchqd::config::Config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("watchqd: invalid configuration: {e}");
            return ExitCode::from(78); // EX_CONFIG
        }
    };
    if args.check_config {
        println!("{config:#?}");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("watchqd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(watchqd::daemon::run(config, args.config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("watchqd: {e}");
            ExitCode::FAILURE
        }
    }
}
