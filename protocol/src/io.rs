//! Async frame read/write over any tokio `AsyncRead`/`AsyncWrite` (a QUIC stream in practice).
//! Thin I/O glue around `frame`; it owns no socket.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{FrameError, HEADER_BYTES, decode_body, decode_len, encode};

/// Reads one frame. `Ok(None)` on a clean end of stream between frames. The length prefix is
/// checked before the body buffer is allocated.
pub async fn read_frame<T, R>(r: &mut R) -> Result<Option<T>, FrameError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let mut header = [0u8; HEADER_BYTES];
    let mut got = 0;
    while got < HEADER_BYTES {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let len = decode_len(header)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })?;
    decode_body(&body).map(Some)
}

/// Encodes and writes one frame.
pub async fn write_frame<T, W>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    let bytes = encode(msg)?;
    w.write_all(&bytes).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::CentralMsg;

    #[tokio::test]
    async fn reads_back_what_was_written_and_refuses_oversize() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, &CentralMsg::Ack { through_seq: 9 })
            .await
            .unwrap();
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        drop(a);
        let got: Option<CentralMsg> = read_frame(&mut b).await.unwrap();
        assert_eq!(got, Some(CentralMsg::Ack { through_seq: 9 }));
        assert!(matches!(
            read_frame::<CentralMsg, _>(&mut b).await,
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn clean_eof_is_none_and_partial_header_is_truncated() {
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        assert!(read_frame::<CentralMsg, _>(&mut b).await.unwrap().is_none());
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0]).await.unwrap();
        drop(a);
        assert!(matches!(
            read_frame::<CentralMsg, _>(&mut b).await,
            Err(FrameError::Truncated)
        ));
    }
}
