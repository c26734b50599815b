import AsyncHTTPClient
import NIOCore
import NIOPosix
import NIOSSL

/// Turns what AsyncHTTPClient, NIO and BoringSSL throw into one sentence that names the server and the cause.
enum TransportErrors {
    static func describe(_ error: any Error, pathAndQuery: String, connection: ClusterConnection,
                         timeout: Duration) -> KubernetesAPIError {
        let server = connection.server.display
        let cause = self.cause(error, connection: connection, timeout: timeout)
        return KubernetesAPIError(.unavailable, "cannot read from the API server at \(server) (GET \(pathAndQuery)): \(cause)")
    }

    static func cause(_ error: any Error, connection: ClusterConnection, timeout: Duration) -> String {
        let t = seconds(timeout)
        switch error {
        case is TimeoutError:
            return "no answer within \(t) (the request timeout)"
        case let e as HTTPClientError:
            switch e {
            case .deadlineExceeded, .readTimeout, .writeTimeout, .getConnectionFromPoolTimeout:
                return "no answer within \(t) (the request timeout)"
            case .connectTimeout:
                return "connecting timed out after \(t)"
            case .tlsHandshakeTimeout:
                return "the TLS handshake timed out after \(t)"
            case .remoteConnectionClosed:
                return "the server closed the connection without answering (is it an HTTPS endpoint of an API server?)"
            default:
                return "\(e)"
            }
        case let e as NIOConnectionError:
            if let dns = e.dnsAError ?? e.dnsAAAAError {
                return "DNS lookup of \(e.host) failed (\(dns))"
            }
            if let first = e.connectionErrors.first {
                return "connection to \(first.target) failed: \(socketCause(first.error))"
            }
            return "connection to \(e.host):\(e.port) failed (no address found)"
        case let e as SocketAddressError:
            if case .unknown(let host, _) = e { return "DNS lookup of \(host) failed" }
            return "\(e)"
        case let e as NIOSSLError:
            return tlsCause(e, connection: connection)
        case let e as NIOSSLExtraError:
            if e == .failedToValidateHostname {
                return "TLS failure: the server's certificate is not valid for \(connection.tlsServerName ?? connection.server.host) (\(e))"
            }
            return "TLS failure: \(e)"
        case let e as IOError:
            return socketCause(e)
        case let e as NIOTooManyBytesError:
            return "the answer is larger than \(e.maxBytes.map { "\($0 >> 20) MiB" } ?? "the limit") (the per-response limit)"
        case is CancellationError:
            return "cancelled"
        default:
            let text = "\(error)"
            if text.contains("DNS") || text.contains("resolve") { return "DNS lookup failed (\(text))" }
            return text
        }
    }

    static func socketCause(_ error: any Error) -> String {
        if let io = error as? IOError {
            switch io.errnoCode {
            case 111: return "connection refused (nothing listens on that port)"  // ECONNREFUSED
            case 113, 101: return "no route to host"                                // EHOSTUNREACH, ENETUNREACH
            case 110: return "connection timed out"                                 // ETIMEDOUT
            case 104: return "connection reset by the server"                       // ECONNRESET
            default: return "\(io)"
            }
        }
        if error is NIOConnectionError || error is SocketAddressError { return "\(error)" }
        return "\(error)"
    }

    static func tlsCause(_ e: NIOSSLError, connection: ClusterConnection) -> String {
        let text = "\(e)"
        if text.contains("CERTIFICATE_VERIFY_FAILED") {
            let trusted: String
            switch connection.trust {
            case .certificateAuthority(let ca): trusted = "the cluster CA from \(ca.origin)"
            case .systemRoots: trusted = "the system's CA bundle (the kubeconfig names no certificate-authority)"
            case .insecureSkipVerify: trusted = "nothing (verification is off)"
            }
            return "TLS failure: the server's certificate is not signed by \(trusted); certificate verify failed"
        }
        if text.contains("CERTIFICATE_REQUIRED") || text.contains("HANDSHAKE_FAILURE") || text.contains("BAD_CERTIFICATE") {
            return "TLS failure: the server refused the handshake (it may require a client certificate): \(text)"
        }
        if text.contains("WRONG_VERSION_NUMBER") || text.contains("PACKET_LENGTH_TOO_LONG") {
            return "TLS failure: the server did not answer with TLS (is it plain HTTP?)"
        }
        return "TLS failure: \(text)"
    }
}
