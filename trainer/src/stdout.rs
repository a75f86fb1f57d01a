//! Lines for the user on stdout. A reader that goes away (`medmerge-trainer split … | head`)
//! ends the program quietly with status 0, as it ends any Unix filter, instead of the panic
//! `println!` raises on a closed pipe.

use std::fmt;
use std::io::{ErrorKind, Write};

/// Writes one line to stdout; on a closed pipe exits 0, on any other write error exits 1 with
/// the error on stderr.
pub fn line(args: fmt::Arguments) {
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(args).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("Error: cannot write to stdout: {e}");
            std::process::exit(1)
        }
    }
}

/// `println!` for the CLI's output (see [`line`]).
macro_rules! say {
    ($($arg:tt)*) => { $crate::stdout::line(format_args!($($arg)*)) };
}
pub(crate) use say;
