import Foundation

/// TCP or UDP, for the traffic helpers.
public enum TestTransport: String, Sendable, CaseIterable {
    case tcp
    case udp
}

private let echoServerScript = #"""
import socket, sys
proto, addr, port, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
fam = socket.AF_INET6 if ':' in addr else socket.AF_INET
if proto == 'tcp':
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(256)
    print('ready', flush=True)
    while True:
        c, peer = s.accept()
        try:
            c.settimeout(5)
            data = c.recv(65536)
            c.sendall(('%s %s ' % (name, peer[0])).encode() + data)
        except Exception:
            pass
        finally:
            c.close()
else:
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((addr, port))
    print('ready', flush=True)
    while True:
        data, peer = s.recvfrom(65536)
        s.sendto(('%s %s ' % (name, peer[0])).encode() + data, peer)
"""#

private let clientScript = #"""
import socket, sys
proto, host, port, msg, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode(), int(sys.argv[5]), float(sys.argv[6])
source = sys.argv[7] if len(sys.argv) > 7 else ''
fam = socket.AF_INET6 if ':' in host else socket.AF_INET
for i in range(count):
    s = None
    try:
        if proto == 'tcp':
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(timeout)
            if source:
                s.bind((source, 0))
            s.connect((host, port))
            s.sendall(msg)
            data = s.recv(65536)
        else:
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.settimeout(timeout)
            if source:
                s.bind((source, 0))
            s.sendto(msg, (host, port))
            data, _ = s.recvfrom(65536)
        print('OK ' + data.decode(errors='replace'), flush=True)
    except Exception as e:
        print('ERR ' + type(e).__name__, flush=True)
    finally:
        if s is not None:
            s.close()
"""#

/// A TCP or UDP server in a namespace that answers every request with `"<name> <peer address> <request>"`.
public final class EchoServer: @unchecked Sendable {
    public let namespace: TestNamespace
    public let transport: TestTransport
    public let address: String
    public let port: Int
    public let name: String
    private let process: BackgroundProcess

    public init(in namespace: TestNamespace, _ transport: TestTransport, address: String, port: Int, name: String) throws {
        try checkDocumentation([address])
        self.namespace = namespace; self.transport = transport; self.address = address; self.port = port; self.name = name
        process = try namespace.spawn(["python3", "-c", echoServerScript, transport.rawValue, address, String(port), name],
                                      readyMarker: "ready")
    }

    public func stop() { process.stop() }
    deinit { process.stop() }
}

/// Runs `body` with servers started as described, and stops them afterwards whatever happens.
public func withEchoServers<T>(_ specs: [(namespace: TestNamespace, transport: TestTransport, address: String, port: Int, name: String)],
                               _ body: ([EchoServer]) throws -> T) throws -> T {
    var servers: [EchoServer] = []
    defer { for s in servers { s.stop() } }
    for s in specs { servers.append(try EchoServer(in: s.namespace, s.transport, address: s.address, port: s.port, name: s.name)) }
    return try body(servers)
}

/// One request's outcome.
public struct ExchangeReply: Sendable, Hashable, CustomStringConvertible {
    /// The server's name, or nil when the exchange failed.
    public let server: String?
    /// The client address the server saw.
    public let peer: String?
    /// For failures: the Python exception name (e.g. "timeout", "ConnectionRefusedError").
    public let error: String?

    public var succeeded: Bool { server != nil }
    public var description: String { server.map { "\($0) (from \(peer ?? "?"))" } ?? "error \(error ?? "?")" }
}

/// Performs `count` independent exchanges (a new connection / new UDP socket each, so each is a new
/// conntrack entry) from `namespace` to `host:port`, each with `timeout` seconds, in one client process.
/// `source` binds the client to that local address (a node address inside or outside source ranges).
public func exchange(from namespace: TestNamespace, _ transport: TestTransport, host: String, port: Int,
                     count: Int = 1, timeout: Double = 2, message: String = "ping", source: String? = nil) throws -> [ExchangeReply] {
    let r = try namespace.run(["python3", "-c", clientScript, transport.rawValue, host, String(port), message, String(count), String(timeout)]
                              + (source.map { [$0] } ?? []),
                              timeout: Double(count) * (timeout + 1) + 10)
    guard r.status == 0 else { throw TestSupportError("client failed: \(r)") }
    return r.stdout.split(separator: "\n").map { line -> ExchangeReply in
        if line.hasPrefix("OK ") {
            let parts = line.dropFirst(3).split(separator: " ", maxSplits: 2).map(String.init)
            return ExchangeReply(server: parts.first, peer: parts.count > 1 ? parts[1] : nil, error: nil)
        }
        return ExchangeReply(server: nil, peer: nil, error: String(line.dropFirst(4)))
    }
}
