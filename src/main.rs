use clap::Parser;

fn main() {
    let cli = microscopiq::cli::Cli::parse();
    match microscopiq::cli::main_with(cli) {
        Ok(code) => std::process::exit(code),
        Err(message) => {
            eprintln!("error: {message}");
            std::process::exit(2);
        }
    }
}
