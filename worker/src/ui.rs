//! Terminal progress for the CLI (indicatif). Hidden when stderr is not a terminal.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use storinator_shared::{Progress, ProgressReport};

pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    pub fn new(what: &str) -> Bar {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(4));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} · {msg:<20} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(250));
        Bar { bar }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Progress for Bar {
    fn report(&self, r: &ProgressReport) {
        self.bar.set_length(r.bytes_total.max(r.bytes_done));
        self.bar.set_position(r.bytes_done);
        // The prefix names the job ("backing up /x"); the message adds what changes, so the
        // line never says the phase twice.
        self.bar.set_message(format!(
            "{}/{}",
            r.files_done,
            storinator_shared::plural(r.files_total, "file", "files")
        ));
    }
}
