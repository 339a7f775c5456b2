//! Copy both ways with half-close: an EOF read on one side is passed on as a FIN
//! (`shutdown(SHUT_WR)`) to the other, and the connection ends when both directions are done
//! (or either fails). Fixed-size buffers, never a whole stream; bytes are counted as written,
//! so the counts are right even when a side fails half-way.

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
    sync::watch,
};

const BUF_SIZE: usize = 16 * 1024;

#[derive(Debug, Default)]
pub(super) struct Transferred {
    /// Client → upstream.
    pub up: u64,
    /// Upstream → client.
    pub down: u64,
    /// Why the connection ended early, if it did.
    pub error: Option<io::Error>,
}

pub(super) async fn bidirectional(
    mut client: TcpStream,
    mut server: TcpStream,
    mut abort: watch::Receiver<bool>,
) -> Transferred {
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let error = {
        let (mut client_r, mut client_w) = client.split();
        let (mut server_r, mut server_w) = server.split();
        let c2s = copy_half(&mut client_r, &mut server_w, &up);
        let s2c = copy_half(&mut server_r, &mut client_w, &down);
        tokio::pin!(c2s, s2c);
        let (mut c2s_done, mut s2c_done) = (false, false);
        let aborted = async {
            // A dropped sender means nobody will ever abort.
            if abort.wait_for(|a| *a).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(aborted);
        loop {
            tokio::select! {
                res = &mut c2s, if !c2s_done => match res {
                    Ok(()) => c2s_done = true,
                    Err(err) => break Some(err),
                },
                res = &mut s2c, if !s2c_done => match res {
                    Ok(()) => s2c_done = true,
                    Err(err) => break Some(err),
                },
                () = &mut aborted => {
                    break Some(io::Error::new(io::ErrorKind::Interrupted, "closed at shutdown"));
                }
            }
            if c2s_done && s2c_done {
                break None;
            }
        }
    };
    Transferred {
        up: up.load(Ordering::Relaxed),
        down: down.load(Ordering::Relaxed),
        error,
    }
}

async fn copy_half<R, W>(r: &mut R, w: &mut W, count: &AtomicU64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Half-close: pass the EOF on and keep the other direction running.
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}
