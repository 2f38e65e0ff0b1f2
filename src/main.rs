fn main() {
    std::process::exit(dpo::cli::main_with_args(std::env::args().collect()));
}
