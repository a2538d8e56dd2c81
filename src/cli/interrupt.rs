//! Ctrl-C for `run`: the first press asks the generation loop to stop at its next step, so
//! the text so far, the panel and the summary stay on screen and the exit code is 130. Where
//! the loop cannot take it up within [`GRACE`] (inside a long prefill chunk, a load, a write),
//! or on a second press, the process exits at once with 130. No phase ignores Ctrl-C.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Once;
use std::time::Duration;

/// How long the loop has to notice the first Ctrl-C before the process exits by itself.
pub const GRACE: Duration = Duration::from_millis(1500);

/// The exit code after Ctrl-C (128 + SIGINT), as shells report it.
pub const EXIT_CODE: u8 = 130;

const RUNNING: u8 = 0;
const REQUESTED: u8 = 1;
const TAKEN: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(RUNNING);
static INSTALL: Once = Once::new();

/// Install the handler (once per process; later calls do nothing).
pub fn install() {
    INSTALL.call_once(|| {
        // Another handler already set (a library user's) is not ours to replace.
        let _ = ctrlc::set_handler(|| {
            if STATE.swap(REQUESTED, Ordering::SeqCst) != RUNNING {
                leave();
            }
            std::thread::spawn(|| {
                std::thread::sleep(GRACE);
                if STATE.load(Ordering::SeqCst) == REQUESTED {
                    leave();
                }
            });
        });
    });
}

/// Whether Ctrl-C was pressed; the caller takes it up (and will stop at once).
pub fn requested() -> bool {
    STATE
        .compare_exchange(REQUESTED, TAKEN, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
        || STATE.load(Ordering::SeqCst) == TAKEN
}

fn leave() -> ! {
    eprintln!("\ninterrupted");
    std::process::exit(EXIT_CODE.into())
}

/// The error `run` ends with after Ctrl-C: `main` exits 130 without an `error:` line.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}
