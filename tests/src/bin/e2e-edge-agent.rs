//! The `edge-agent` binary, built inside the e2e package so its tests can spawn (and
//! `kill -9`) the exact code under test via `CARGO_BIN_EXE_e2e-edge-agent`.
fn main() -> std::process::ExitCode {
    edge_agent::cli::main()
}
