fn main() {
    println!("artifactfs: under construction");
}
