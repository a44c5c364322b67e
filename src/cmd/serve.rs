//! `dsync serve`: a repository for a dsync on another machine, over
//! standard input and output (store::remote::serve, PROTOCOL.md).

use dsync_store::remote::serve::{serve_stdio, ServeOptions};

use crate::cli::ServeArgs;

pub fn run(o: ServeArgs) -> anyhow::Result<()> {
    let opts = ServeOptions {
        append_only: o.append_only,
        read_only: o.read_only,
        restrict_to: o.restrict_to_path,
    };
    serve_stdio(&opts)?;
    Ok(())
}
