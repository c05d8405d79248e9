//! Tunnels for upgraded connections (WebSocket): bytes copied both ways until either side
//! closes. The tunnel holds its slot for its whole life.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::outbound::response_body::ExchangeGuard;

/// Joins the client's and the app's upgraded connections and copies between them.
pub(super) async fn tunnel(client: OnUpgrade, app: OnUpgrade, guard: ExchangeGuard) {
    match tokio::try_join!(client, app) {
        Ok((client, app)) => {
            let mut client = TokioIo::new(client);
            let mut app = TokioIo::new(app);
            match tokio::io::copy_bidirectional(&mut client, &mut app).await {
                Ok((up, down)) => {
                    tracing::debug!(bytes.up = up, bytes.down = down, "Tunnel closed")
                }
                Err(error) => tracing::debug!(%error, "Tunnel ended with an error"),
            }
        }
        Err(error) => tracing::debug!(%error, "Upgrade failed"),
    }
    guard.complete();
}
