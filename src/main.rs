//! `box-broker`: parse the command line and hand over to the library.

fn main() -> std::process::ExitCode {
    box_token_broker::cli::main()
}
