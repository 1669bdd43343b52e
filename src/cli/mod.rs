//! The command lines of the two binaries, as clap definitions in the library so that
//! the packaging generator (`examples/packaging-assets.rs`) renders man pages and shell
//! completions from the very structs the binaries parse.

pub mod ctl;
pub mod daemon;
