//! `edge-agent` binary; see [`edge_agent::cli`].

fn main() -> std::process::ExitCode {
    edge_agent::cli::main()
}
