//! Compiles proto/palisade/v1/*.proto with protox (pure Rust, no system protoc).
use protox::prost::Message;

fn main() -> anyhow::Result<()> {
    let fds = protox::compile(["palisade/v1/palisade.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("palisade_descriptor.bin"), fds.encode_to_vec())?;
    // Messages that carry a secret get a redacting Debug (src/redact.rs).
    tonic_prost_build::configure()
        .skip_debug([
            "palisade.v1.CreateJoinTokenResponse",
            "palisade.v1.CreateApiKeyResponse",
            "palisade.v1.CreateOAuthClientResponse",
            "palisade.v1.CertifyRequest",
            "palisade.v1.RotateCaRequest",
        ])
        .compile_fds(fds)?;
    // prost-build does not emit rerun-if-changed on the compile_fds path.
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
