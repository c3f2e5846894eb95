//! Compiles the test app's gRPC service with protox (no system protoc).
fn main() -> anyhow::Result<()> {
    let fds = protox::compile(["echo.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
