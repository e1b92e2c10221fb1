fn main() { println!("dk"); }
