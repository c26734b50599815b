import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// One request as the test server saw it.
struct RecordedRequest: Sendable {
    var method: String
    var path: String
    var rawQuery: String
    var query: [String: String]
    var authorization: String?
    var headers: [String: String]
    /// The verified client certificate, when the client sent one.
    var clientCertificate: NIOSSLCertificate?
}

enum Reply: Sendable {
    case json(Int, String)
    case raw(Int, contentType: String, String)
    /// JSON with extra response headers (Retry-After).
    case jsonHeaders(Int, String, [String: String])
    /// Read the request and never answer.
    case hang
    /// A chunked answer (a watch) whose body `script` writes over time through the `ResponseStream`. When
    /// the script returns without `end()` or `drop()`, the connection stays open.
    case stream(Int, @Sendable (ResponseStream) async -> Void)
}

/// The body of a `.stream` reply, written while the client reads it.
final class ResponseStream: Sendable {
    private let channel: any Channel
    /// Bytes of body written so far (without chunk framing).
    let bytesWritten = Box(0)
    /// Bytes the connection has sent on the wire so far: TLS records, HTTP head and chunk framing included.
    let wireBytes: Box<Int>

    fileprivate init(channel: any Channel, wireBytes: Box<Int>) {
        self.channel = channel
        self.wireBytes = wireBytes
    }

    /// One chunk of the body, sent at once.
    func write(_ text: String) async {
        bytesWritten.update { $0 += text.utf8.count }
        try? await channel.writeAndFlush(HTTPServerResponsePart.body(.byteBuffer(ByteBuffer(string: text)))).get()
    }

    /// One chunk of raw bytes (to split a UTF-8 character between chunks).
    func write(bytes: [UInt8]) async {
        bytesWritten.update { $0 += bytes.count }
        try? await channel.writeAndFlush(HTTPServerResponsePart.body(.byteBuffer(ByteBuffer(bytes: bytes)))).get()
    }

    /// Ends the chunked body properly (what kube-apiserver does at `timeoutSeconds`).
    func end() async {
        try? await channel.writeAndFlush(HTTPServerResponsePart.end(nil)).get()
    }

    /// Closes the connection in the middle of the body.
    func drop() async {
        try? await channel.close()
    }

    /// Returns when the connection is closed (by either side).
    func closed() async {
        try? await channel.closeFuture.get()
    }
}

/// A real HTTPS server on loopback (swift-nio + NIOSSL), answering with whatever the test's handler says.
/// With `clientCA` it asks for a client certificate (optional, as kube-apiserver does) and verifies it.
final class TestAPIServer: Sendable {
    let port: Int
    let host: String
    private let channel: any Channel
    private let state: ServerState

    var url: String { host.contains(":") ? "https://[\(host)]:\(port)" : "https://\(host):\(port)" }
    var requests: [RecordedRequest] { state.requests }
    var paths: [String] { state.requests.map { $0.rawQuery.isEmpty ? $0.path : "\($0.path)?\($0.rawQuery)" } }

    private init(port: Int, host: String, channel: any Channel, state: ServerState) {
        self.port = port; self.host = host; self.channel = channel; self.state = state
    }

    static func start(host: String = "127.0.0.1", port: Int = 0, certificate: String = PKI.shared.serverCert,
                      key: String = PKI.shared.serverKey, clientCA: String? = nil,
                      handler: @escaping @Sendable (RecordedRequest) -> Reply) async throws -> TestAPIServer {
        var tls = TLSConfiguration.makeServerConfiguration(
            certificateChain: try NIOSSLCertificate.fromPEMFile(certificate).map { .certificate($0) },
            privateKey: .privateKey(try NIOSSLPrivateKey(file: key, format: .pem)))
        if let clientCA {
            tls.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(clientCA))
            tls.certificateVerification = .optionalVerification
        }
        let context = try NIOSSLContext(configuration: tls)
        let state = ServerState(handler: handler)
        let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                state.track(channel)
                return channel.eventLoop.makeCompletedFuture {
                    let wire = Box(0)
                    try channel.pipeline.syncOperations.addHandler(WireCounter(count: wire))
                    try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: context))
                    // Without pipelining assistance the server keeps reading while a watch body is open, as
                    // kube-apiserver does; with it, a client's TLS close_notify would sit unread until the
                    // client's shutdown timeout (1 s) and a prompt cancellation would look slow.
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withPipeliningAssistance: false, withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(RequestHandler(state: state, wireBytes: wire))
                }
            }
            .bind(host: host, port: port).get()
        guard let port = channel.localAddress?.port else { throw TestServerError.noPort }
        return TestAPIServer(port: port, host: host, channel: channel, state: state)
    }

    func stop() async {
        try? await channel.close()
        for child in state.children { try? await child.close() }
    }

    enum TestServerError: Error { case noPort }
}

/// A free loopback port nothing listens on (bound, then closed).
func closedPort() async throws -> Int {
    let ch = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton).bind(host: "127.0.0.1", port: 0).get()
    let port = ch.localAddress!.port!
    try await ch.close()
    return port
}

private final class ServerState: @unchecked Sendable {
    let handler: @Sendable (RecordedRequest) -> Reply
    private let lock = NSLock()
    private var _requests: [RecordedRequest] = []
    private var _children: [any Channel] = []

    init(handler: @escaping @Sendable (RecordedRequest) -> Reply) { self.handler = handler }

    var requests: [RecordedRequest] { lock.withLock { _requests } }
    var children: [any Channel] { lock.withLock { _children } }
    func record(_ r: RecordedRequest) { lock.withLock { _requests.append(r) } }
    func track(_ c: any Channel) { lock.withLock { _children.append(c) } }
}

private final class RequestHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let state: ServerState
    let wireBytes: Box<Int>
    var head: HTTPRequestHead?

    init(state: ServerState, wireBytes: Box<Int>) { self.state = state; self.wireBytes = wireBytes }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let head else { return }
            self.head = nil
            let parts = head.uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
            let rawQuery = parts.count > 1 ? String(parts[1]) : ""
            var query: [String: String] = [:]
            for pair in rawQuery.split(separator: "&") {
                let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                let k = String(kv[0]).removingPercentEncoding ?? String(kv[0])
                let v = kv.count > 1 ? (String(kv[1]).removingPercentEncoding ?? String(kv[1])) : ""
                query[k] = v
            }
            var headers: [String: String] = [:]
            for (n, v) in head.headers { headers[n.lowercased()] = v }
            let cert = try? context.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self).peerCertificate
            let request = RecordedRequest(method: "\(head.method)", path: String(parts[0]), rawQuery: rawQuery,
                                          query: query, authorization: head.headers.first(name: "Authorization"),
                                          headers: headers, clientCertificate: cert)
            state.record(request)
            let reply = state.handler(request)
            let status: Int, contentType: String, body: String
            var extra: [String: String] = [:]
            switch reply {
            case .hang: return
            case .stream(let s, let script):
                var h = HTTPHeaders()
                h.add(name: "Content-Type", value: "application/json")
                h.add(name: "Transfer-Encoding", value: "chunked")
                let responseHead = HTTPResponseHead(version: head.version, status: HTTPResponseStatus(statusCode: s), headers: h)
                context.writeAndFlush(wrapOutboundOut(.head(responseHead)), promise: nil)
                let stream = ResponseStream(channel: context.channel, wireBytes: wireBytes)
                Task { await script(stream) }
                return
            case .json(let s, let b): (status, contentType, body) = (s, "application/json", b)
            case .raw(let s, let ct, let b): (status, contentType, body) = (s, ct, b)
            case .jsonHeaders(let s, let b, let h): (status, contentType, body, extra) = (s, "application/json", b, h)
            }
            var h = HTTPHeaders()
            for (n, v) in extra { h.add(name: n, value: v) }
            h.add(name: "Content-Type", value: contentType)
            h.add(name: "Content-Length", value: String(body.utf8.count))
            let responseHead = HTTPResponseHead(version: head.version, status: HTTPResponseStatus(statusCode: status), headers: h)
            context.write(wrapOutboundOut(.head(responseHead)), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: body)))), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

/// Counts the bytes a connection writes to its socket (it sits below TLS).
private final class WireCounter: ChannelOutboundHandler {
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let count: Box<Int>
    init(count: Box<Int>) { self.count = count }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let n = unwrapOutboundIn(data).readableBytes
        count.update { $0 += n }
        context.write(data, promise: promise)
    }
}
