//! A one-line progress bar on stderr for `warm`, drawn only on a terminal.

use super::warm::{Item, Outcome};
use std::io::{IsTerminal, Write};
use std::sync::Mutex;

pub struct Progress {
    on: bool,
    state: Mutex<(usize, usize, usize)>,
}

const WIDTH: usize = 30;

impl Progress {
    /// Draws on stderr when it is a terminal and `wanted`.
    pub fn new(wanted: bool) -> Progress {
        Progress {
            on: wanted && std::io::stderr().is_terminal(),
            state: Mutex::new((0, 0, 0)),
        }
    }

    /// More items became known.
    pub fn grow(&self, n: usize) {
        self.state.lock().expect("progress lock").1 += n;
        self.draw(None);
    }

    /// One item ended.
    pub fn done(&self, item: &Item) {
        {
            let mut s = self.state.lock().expect("progress lock");
            s.0 += 1;
            if item.outcome == Outcome::Failed {
                s.2 += 1;
            }
        }
        self.draw(Some(item));
    }

    fn draw(&self, last: Option<&Item>) {
        if !self.on {
            return;
        }
        let (done, total, failed) = *self.state.lock().expect("progress lock");
        let filled = (done * WIDTH).checked_div(total).unwrap_or(0);
        let bar: String = "#".repeat(filled) + &"-".repeat(WIDTH - filled);
        let what = last.map(|i| i.item.as_str()).unwrap_or("");
        let what: String = what.chars().take(60).collect();
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K[{bar}] {done}/{total}{} {what}",
            if failed > 0 {
                format!(" ({failed} failed)")
            } else {
                String::new()
            }
        );
        let _ = err.flush();
    }

    /// Ends the bar's line.
    pub fn finish(&self) {
        if self.on {
            eprintln!();
        }
    }
}
