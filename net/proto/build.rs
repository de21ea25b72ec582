//! Generates the Rust messages of the wire protocols from `docs/protocol/*.proto`.
//! Pure Rust (protox), so no system `protoc` is needed.

const PROTO_DIR: &str = "../../docs/protocol";
const PROTO_FILES: [&str; 2] = ["incubator.proto", "viewer.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={PROTO_DIR}/{file}");
    }
    let file_descriptor_set = protox::compile(PROTO_FILES, [PROTO_DIR])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(file_descriptor_set)?;
    Ok(())
}
