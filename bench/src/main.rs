//! `relay-bench`: see `relay-bench --help` and the crate docs.

fn main() -> std::process::ExitCode {
    relay_bench::main_entry()
}
