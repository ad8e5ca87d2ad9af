//! Compiles the contract in `proto/` with protox (pure Rust: no system `protoc`), and keeps the encoded
//! descriptor set for server reflection.

use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &["proto/capability/v1/capability_service.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("capability_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .codec_path("crate::grpc::codec::SmallBufferCodec")
        .compile_fds(fds)?;
    Ok(())
}
