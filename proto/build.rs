//! Compiles proto/palisade/v1/*.proto with protox (pure Rust, no system protoc).
use protox::prost::Message;

fn main() -> anyhow::Result<()> {
    let fds = protox::compile(["palisade/v1/palisade.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("palisade_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    // prost-build does not emit rerun-if-changed on the compile_fds path.
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
