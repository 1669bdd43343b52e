//! A child process's output, line by line, on a channel that a test can wait on with a
//! timeout (reading the pipe itself would block). Each reader is a thread that ends at end
//! of file, at a read error, or when the receiver is gone.

use std::io::{BufRead, BufReader, Read};
use std::sync::mpsc::{channel, Receiver, Sender};

/// Every line of `source`.
pub fn lines(source: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    forward(source, tx, |line| line);
    rx
}

/// Every line of `source`, sent on `tx` as `wrap(line)`: several sources on one channel
/// (a child's stdout and stderr, told apart by `wrap`).
pub fn forward<T: Send + 'static>(
    source: impl Read + Send + 'static,
    tx: Sender<T>,
    wrap: fn(String) -> T,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(source).lines().map_while(Result::ok) {
            if tx.send(wrap(line)).is_err() {
                break;
            }
        }
    });
}

/// What a test binary re-run as a client process answers: the text after `@@ ` of each
/// line that has one (libtest may have printed "test client_process ... " before it on
/// the same line; other lines are libtest's own).
pub fn answers(source: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(source).lines().map_while(Result::ok) {
            if let Some((_, answer)) = line.split_once("@@ ") {
                if tx.send(answer.to_owned()).is_err() {
                    break;
                }
            }
        }
    });
    rx
}
