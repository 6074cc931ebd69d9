fn main() -> std::process::ExitCode {
    storinator_worker::cli::main()
}
