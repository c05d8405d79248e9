//! The `tidegate` binary: parse flags, set up logging, build the proxy runtime, run.

#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used)]

use std::process::ExitCode;

use tidegate::{
    Child, Config, DrainOutcome, EXIT_CONFIG, EXIT_DRAIN_TIMEOUT, EXIT_FAILURE, Lifecycle,
    RuntimeMode, Server,
};

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("check") {
        let code = tidegate::check::main(std::env::args().skip(1));
        return ExitCode::from(code as u8);
    }
    let config = match parse() {
        Ok(config) => config,
        Err(code) => return code,
    };
    // Kept until the end of main: dropping it writes out the queued lines.
    let _log_writer = match tidegate::init_logging(config.args.log_format, &config.args.log) {
        Ok(writer) => writer,
        Err(error) => {
            eprintln!("tidegate: {}", chain(&error));
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let nofile = tidegate::raise_fd_limit();
    tracing::debug!(?nofile, "File descriptor limit");
    // One thread, or a runtime per thread (the server starts the others): a current-thread
    // runtime here, without the work-stealing machinery.
    let mut builder = match (config.args.runtime, config.worker_threads()) {
        (RuntimeMode::PerThread, _) | (_, 1) => tokio::runtime::Builder::new_current_thread(),
        (RuntimeMode::Shared, n) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    let runtime = match builder.thread_name("tidegate-proxy").enable_all().build() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("tidegate: cannot start the proxy runtime: {error}");
            return ExitCode::from(EXIT_FAILURE as u8);
        }
    };
    let code = runtime.block_on(run(config));
    // Connection tasks cut off by the drain timeout are dropped here, not waited for.
    runtime.shutdown_background();
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn parse() -> Result<Config, ExitCode> {
    Config::from_env_args().map_err(|error| {
        match error {
            tidegate::ConfigError::Flags(line) => {
                eprintln!("tidegate: {line} (see --help)")
            }
            error => eprintln!("tidegate: {}", chain(&error)),
        }
        ExitCode::from(EXIT_CONFIG as u8)
    })
}

async fn run(config: Config) -> i32 {
    let server = match Server::bind(config.clone()) {
        Ok(server) => server,
        Err(error) => {
            eprintln!("tidegate: {}", chain(&error));
            return EXIT_CONFIG;
        }
    };
    let lifecycle = server.lifecycle();
    let reloader = server.reloader();
    let signals = match tidegate::signals::listen() {
        Ok(signals) => signals,
        Err(error) => {
            eprintln!("tidegate: cannot register signal handlers: {error}");
            return EXIT_FAILURE;
        }
    };
    let child = if config.is_supervisor() {
        match Child::spawn(&config.args.command) {
            Ok(child) => Some(std::sync::Arc::new(child)),
            Err(error) => {
                eprintln!("tidegate: {}", chain(&error));
                return error.exit_code();
            }
        }
    } else {
        None
    };
    tracing::info!(
        listen.addr = %server.proxy_addr(),
        admin.addr = %server.admin_addr(),
        upstream = ?config.args.upstream,
        "Tidegate started"
    );
    let immediate_exit = {
        let lifecycle = lifecycle.clone();
        let child = child.clone();
        async move {
            let code = tidegate::signals::drive(signals, lifecycle, reloader).await;
            if let Some(child) = child {
                child.kill();
            }
            code
        }
    };
    if let Some(child) = &child {
        tokio::spawn(watch_child(child.clone(), lifecycle.clone()));
    }
    let running = match server.start() {
        Ok(running) => running,
        Err(error) => {
            eprintln!("tidegate: {}", chain(&error));
            return EXIT_FAILURE;
        }
    };
    // Signals are listened to until the process exits, the child's stop included: a third
    // signal (or SIGQUIT) exits at once whatever tidegate is waiting for.
    tokio::pin!(immediate_exit);
    let outcome = tokio::select! {
        outcome = running.run() => outcome,
        code = &mut immediate_exit => return code,
    };
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(error) => {
            eprintln!("tidegate: {}", chain(&error));
            return EXIT_FAILURE;
        }
    };
    if let Some(child) = child {
        // The app gets SIGTERM only now, after tidegate stopped sending it work.
        return tokio::select! {
            code = child.stop(config.args.child_stop_timeout) => code,
            code = &mut immediate_exit => code,
        };
    }
    match outcome {
        DrainOutcome::Complete => 0,
        DrainOutcome::TimedOut { .. } => EXIT_DRAIN_TIMEOUT,
    }
}

/// When the app dies on its own, fail readiness and shut down at once so the container
/// restarts; its exit code becomes tidegate's.
async fn watch_child(child: std::sync::Arc<Child>, lifecycle: Lifecycle) {
    let code = child.exited().await;
    if lifecycle.start_shutdown() {
        tracing::error!(code, "App exited on its own; shutting down");
    }
    // Nothing is left to serve: no delay.
    lifecycle.skip_delay();
}

fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    tidegate::ErrorChain(error).to_string()
}
