//! The progress bar: shown on stderr once a run has lasted a second, and
//! only when stderr is a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

/// How long a run lasts before its bar appears.
const SHOW_AFTER: Duration = Duration::from_secs(1);

/// A progress bar that stays hidden for short runs and in pipes.
pub struct Bar {
    pb: ProgressBar,
    started: Instant,
    shown: bool,
    tty: bool,
}

impl Bar {
    /// A bar over `len` units named `unit` (e.g. "msgs", "s", "cells").
    pub fn new(len: u64, unit: &str) -> Self {
        let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
        let style = ProgressStyle::with_template(&format!(
            "{{spinner}} {{elapsed:>4}} [{{bar:36}}] {{pos}}/{{len}} {unit} {{msg}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        pb.set_style(style);
        Self {
            pb,
            started: Instant::now(),
            shown: false,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// Moves the bar to `pos` with a message.
    pub fn set(&mut self, pos: u64, msg: impl Into<String>) {
        if !self.shown && self.tty && self.started.elapsed() >= SHOW_AFTER {
            self.pb.set_draw_target(ProgressDrawTarget::stderr());
            self.shown = true;
        }
        self.pb.set_position(pos);
        self.pb.set_message(msg.into());
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.pb.finish_and_clear();
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.pb.finish_and_clear();
    }
}
