//! `caisey`: see the library for what it does.

fn main() -> std::process::ExitCode {
    caisey_viewer::cli::main()
}
