//! The `cloud-hub` binary, built inside the e2e package so its tests can spawn (and
//! `kill -9`) the exact code under test via `CARGO_BIN_EXE_e2e-cloud-hub`.
fn main() -> std::process::ExitCode {
    cloud_hub::cli::main()
}
