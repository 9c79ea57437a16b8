//! The `relay` binary. The node itself lands with issue 3.

fn main() {
    eprintln!(
        "relay: the node is not built yet (issue 3). The wire codec is in crate relay-codec; \
         run `cargo test --workspace` to check it."
    );
    std::process::exit(2);
}
