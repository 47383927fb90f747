//! The option help text for `tandem-bench run --help`, generated from the option
//! table so the help can never list an option the parser does not know.

use std::fmt::Write as _;

use super::options::{ValueKind, IGNORED_OPTIONS, OPTION_TABLE};

/// Help for fio-style arguments: the command-line model, every option with its
/// aliases, the options accepted without effect, and the output options.
pub fn usage() -> String {
    let mut text = String::from(
        "fio-style arguments: [--global options] [--name=JOB [job options]]... [job file]...\n\
         Options before the first --name apply to every job; each --name starts a job.\n\
         Write --key=value (or --key value); flags may be bare (--time_based).\n\
         Sizes: 4k = 4096, 1m, 2g (k is 1024, as in fio). Times: 30 = 30s, 500ms, 2m.\n\nJob options:\n",
    );
    for def in OPTION_TABLE {
        let syntax = match def.kind {
            ValueKind::Required => format!("--{}=VALUE", def.name),
            ValueKind::Flag => format!("--{}[=0|1]", def.name),
        };
        let aliases = match def.aliases {
            [] => String::new(),
            names => format!(" (alias: {})", names.join(", ")),
        };
        // Writing to a String cannot fail.
        let _ = writeln!(text, "  {syntax:<24} {}{aliases}", def.help);
    }
    let ignored: Vec<&str> = IGNORED_OPTIONS.iter().map(|def| def.name).collect();
    let _ = write!(
        text,
        "\nAccepted for job-file compatibility, without effect: {}\n\n\
         Output:\n  --output-format=FORMAT    normal (default), json or json+\n  --output=FILE             write results to FILE\n",
        ignored.join(", ")
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_lists_every_option_and_alias() {
        let text = usage();
        for def in OPTION_TABLE.iter().chain(IGNORED_OPTIONS) {
            assert!(text.contains(def.name), "usage misses {}", def.name);
        }
        assert!(text.contains("--bs=VALUE") && text.contains("alias: blocksize"));
        assert!(text.contains("--time_based[=0|1]"));
        assert!(text.contains("--output-format=FORMAT"));
    }
}
