//! The contract's codec: prost, with a small initial buffer. Every open stream keeps its encode buffer for its
//! whole life, and tonic's default (8 KiB) was most of an idle watch's memory; our messages are small (a
//! notification is a few hundred bytes) and the buffer grows when one needs more. 256 bytes rather than 1 KiB
//! took 766 bytes off each idle watch (BENCHMARKS.md, issue 16); a stream that sends a larger message reallocates
//! once for it.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The initial size of each call's encode and decode buffers.
const BUFFER_SIZE: usize = 256;
/// tonic's default: yield to the runtime after encoding this much in one go.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`BUFFER_SIZE`] buffers; named by `codec_path` in build.rs.
#[derive(Debug)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        SmallBufferCodec(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }
}
