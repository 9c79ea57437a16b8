//! Logs of the binaries at both ends of a link (`relay`, `cell`,
//! `relay-bench`): one format, on stderr, coloured only for a person at a
//! terminal. Here rather than in each binary's crate so that the relay,
//! which does not link the cell's crate, logs the same way.

/// Whether log lines on stderr get ANSI colours: only when stderr is a
/// terminal, and never when `NO_COLOR` is set to anything but the empty
/// string (<https://no-color.org>). A log redirected to a file or a pipe
/// holds plain text.
pub fn colour_stderr() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Sends `tracing` events to stderr, filtered by `RUST_LOG` or else by
/// `default_filter` (e.g. `"warn"`), coloured as [`colour_stderr`] says.
/// Does nothing if this process already has a subscriber.
pub fn init(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour_stderr())
        .try_init();
}
