import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

/// The agent's two small HTTP listeners: `GET /metrics` on `--metrics-bind-address`, `GET /healthz` and
/// `GET /readyz` on `--healthz-bind-address` (both on one listener when the two addresses are the same).
///
/// Built on NIO's HTTP/1 server pipeline, which is already in the dependency graph (for the API client), rather
/// than a web framework: three fixed paths need no router, and nothing new is linked into the binary.
///
/// It must not be able to hurt the node or the sync loop:
/// - it runs on its own one-thread event loop group, and answers from `AgentMetrics` / `HealthState`, which
///   take only short locks: the loop never waits for a slow or hostile client;
/// - at most `Limits.maxConnections` connections per listener (more are closed on accept), request headers
///   limited to `Limits.maxHeaderBytes` (NIO answers 400), at most `Limits.maxRequestBytes` read per request,
///   and a connection that does not complete a request within `Limits.requestTimeout` (slow or idle) is closed;
/// - only those paths: anything else is 404, any method but GET is 405.
public final class AgentHTTPServer: Sendable {
    /// Resource limits per listener.
    public struct Limits: Sendable {
        public var maxConnections: Int
        public var maxHeaderBytes: Int
        public var maxRequestBytes: Int
        public var requestTimeout: TimeAmount

        public init(maxConnections: Int = 16, maxHeaderBytes: Int = 8 * 1024, maxRequestBytes: Int = 16 * 1024,
                    requestTimeout: TimeAmount = .seconds(10)) {
            self.maxConnections = maxConnections
            self.maxHeaderBytes = maxHeaderBytes
            self.maxRequestBytes = maxRequestBytes
            self.requestTimeout = requestTimeout
        }
    }

    /// The port `/metrics` is served on (the bound one, when the address asked for port 0); nil when disabled.
    public let metricsPort: Int?
    /// The port `/healthz` and `/readyz` are served on; nil when disabled.
    public let healthzPort: Int?

    private let group: MultiThreadedEventLoopGroup
    private let channels: [any Channel]
    private let stopped = NIOLockedValueBox(false)

    private init(group: MultiThreadedEventLoopGroup, channels: [any Channel], metricsPort: Int?, healthzPort: Int?) {
        self.group = group
        self.channels = channels
        self.metricsPort = metricsPort
        self.healthzPort = healthzPort
    }

    /// Binds the listeners and starts serving. Returns once both are bound.
    /// - Parameters:
    ///   - metricsAddress: `--metrics-bind-address`; nil disables `/metrics`.
    ///   - healthzAddress: `--healthz-bind-address`; nil disables `/healthz` and `/readyz`.
    /// - Throws: `.unavailable` naming the address, the flag and the cause when a listener cannot be bound
    ///   (port taken, address not on this node); nothing is left listening then.
    public static func start(metricsAddress: ListenAddress?, healthzAddress: ListenAddress?,
                             metrics: AgentMetrics, health: HealthState, limits: Limits = Limits(),
                             logger: Logger = Logger(label: "hostnet-dnat.http")) async throws(AgentOperationsError) -> AgentHTTPServer {
        var listeners: [(ListenAddress, Set<Route>, String)] = []
        if let m = metricsAddress, let h = healthzAddress, m == h, m.port != 0 {
            listeners.append((m, [.metrics, .healthz, .readyz], "--metrics-bind-address and --healthz-bind-address"))
        } else {
            if let m = metricsAddress { listeners.append((m, [.metrics], "--metrics-bind-address")) }
            if let h = healthzAddress { listeners.append((h, [.healthz, .readyz], "--healthz-bind-address")) }
        }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        var channels: [any Channel] = []
        var metricsPort: Int?, healthzPort: Int?
        for (address, routes, flags) in listeners {
            let responder = Responder(routes: routes, metrics: metrics, health: health)
            let connections = NIOLockedValueBox(0)
            let bootstrap = ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 32)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                .childChannelInitializer { channel in
                    let admitted = connections.withLockedValue { n -> Bool in
                        guard n < limits.maxConnections else { return false }
                        n += 1
                        return true
                    }
                    guard admitted else {
                        logger.debug("too many connections; closing a new one", metadata: ["listener": "\(address)"])
                        return channel.close()
                    }
                    channel.closeFuture.whenComplete { _ in connections.withLockedValue { $0 -= 1 } }
                    return channel.eventLoop.makeCompletedFuture {
                        let pipeline = channel.pipeline.syncOperations
                        try pipeline.addHandler(RequestBudget(limit: limits.maxRequestBytes))
                        var decoderLimits = NIOHTTPDecoderLimitConfiguration()
                        decoderLimits.maxHeaderListSize = limits.maxHeaderBytes
                        decoderLimits.maxHeaderFieldSize = limits.maxHeaderBytes
                        decoderLimits.maxHeaderFieldCount = 100
                        try pipeline.configureHTTPServerPipeline(withPipeliningAssistance: true, withErrorHandling: true,
                                                                 withOutboundHeaderValidation: true,
                                                                 withEncoderConfiguration: .init(),
                                                                 withDecoderLimitConfiguration: decoderLimits)
                        try pipeline.addHandler(AgentHTTPHandler(responder: responder, timeout: limits.requestTimeout))
                    }
                }
            do {
                let channel = try await bootstrap.bind(host: address.host, port: address.port).get()
                channels.append(channel)
                let port = channel.localAddress?.port
                if routes.contains(.metrics) { metricsPort = port }
                if routes.contains(.healthz) { healthzPort = port }
                logger.info("serving \(routes.sorted().map { "/" + $0.rawValue }.joined(separator: ", "))",
                            metadata: ["address": "\(ListenAddress(host: address.host, port: port ?? address.port))"])
            } catch {
                for c in channels { try? await c.close() }
                try? await group.shutdownGracefully()
                throw .unavailable("cannot listen on \(address) (\(flags)): \(describe(error)); "
                                   + "choose a free port and an address of this node, or 0 to disable")
            }
        }
        return AgentHTTPServer(group: group, channels: channels, metricsPort: metricsPort, healthzPort: healthzPort)
    }

    /// Stops listening, closes open connections and the event loop. Idempotent.
    public func stop() async {
        let already = stopped.withLockedValue { s -> Bool in defer { s = true }; return s }
        if already { return }
        for c in channels { try? await c.close() }
        try? await group.shutdownGracefully()
    }

    private static func describe(_ error: any Error) -> String {
        if let io = error as? IOError {
            switch io.errnoCode {
            case EADDRINUSE: return "the port is already in use"
            case EADDRNOTAVAIL: return "the address is not assigned to this node"
            case EACCES: return "permission denied"
            default: return String(cString: strerror(io.errnoCode))
            }
        }
        return "\(error)"
    }
}

enum Route: String, Sendable, Comparable {
    case metrics, healthz, readyz
    static func < (a: Route, b: Route) -> Bool { a.rawValue < b.rawValue }
}

/// The pure part: a method and a path in, a response out.
struct Responder: Sendable {
    let routes: Set<Route>
    let metrics: AgentMetrics
    let health: HealthState

    struct Response: Sendable {
        var status: HTTPResponseStatus
        var contentType: String
        var body: String
        var extraHeaders: [(String, String)] = []
    }

    func respond(method: HTTPMethod, uri: String) -> Response {
        let path = String(uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? "")
        guard let route = Route(rawValue: String(path.dropFirst())), path.hasPrefix("/"), routes.contains(route) else {
            return Response(status: .notFound, contentType: "text/plain; charset=utf-8", body: "404 page not found\n")
        }
        guard method == .GET else {
            return Response(status: .methodNotAllowed, contentType: "text/plain; charset=utf-8",
                            body: "405 method not allowed: only GET\n", extraHeaders: [("Allow", "GET")])
        }
        switch route {
        case .metrics:
            return Response(status: .ok, contentType: AgentMetrics.expositionContentType, body: metrics.exposition())
        case .healthz, .readyz:
            let report = route == .healthz ? health.healthz() : health.readyz()
            return Response(status: report.status == 200 ? .ok : .serviceUnavailable, contentType: "application/json", body: report.body)
        }
    }
}

/// Closes the connection when more than `limit` bytes arrive for one request (headers and any body); the
/// count starts again after each response. Sits before the HTTP decoder, so it also bounds a request line
/// that never ends.
final class RequestBudget: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = IOData
    typealias OutboundOut = IOData

    struct Reset {}

    private let limit: Int
    private var used = 0

    init(limit: Int) { self.limit = limit }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        used += unwrapInboundIn(data).readableBytes
        guard used <= limit else {
            context.close(promise: nil)
            return
        }
        context.fireChannelRead(data)
    }

    func triggerUserOutboundEvent(context: ChannelHandlerContext, event: Any, promise: EventLoopPromise<Void>?) {
        guard event is Reset else {
            context.triggerUserOutboundEvent(event, promise: promise)
            return
        }
        used = 0
        promise?.succeed(())
    }
}

/// One HTTP/1.1 connection: requests in order (NIO's pipelining handler holds back the next one until the
/// response is written), a deadline for each.
final class AgentHTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let responder: Responder
    private let timeout: TimeAmount
    private var head: HTTPRequestHead?
    private var deadline: Scheduled<Void>?

    init(responder: Responder, timeout: TimeAmount) {
        self.responder = responder
        self.timeout = timeout
    }

    func handlerAdded(context: ChannelHandlerContext) {
        armDeadline(context: context)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        deadline?.cancel()
    }

    /// A connection gets `timeout` for each request, from its opening or the previous response: neither a
    /// client trickling bytes nor an idle keep-alive connection holds a slot longer.
    private func armDeadline(context: ChannelHandlerContext) {
        deadline?.cancel()
        deadline = context.eventLoop.assumeIsolated().scheduleTask(in: timeout) {
            context.close(promise: nil)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h):
            head = h
        case .body:
            break  // counted by RequestBudget; GET needs none
        case .end:
            guard let h = head else { return }
            head = nil
            let response = responder.respond(method: h.method, uri: h.uri)
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: response.contentType)
            headers.add(name: "Content-Length", value: String(response.body.utf8.count))
            headers.add(name: "Cache-Control", value: "no-store")
            headers.add(name: "X-Content-Type-Options", value: "nosniff")
            for (name, value) in response.extraHeaders { headers.add(name: name, value: value) }
            let keepAlive = h.isKeepAlive
            if !keepAlive { headers.add(name: "Connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: response.status, headers: headers))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: response.body)))), promise: nil)
            let done = context.writeAndFlushPromise()
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: done)
            context.triggerUserOutboundEvent(RequestBudget.Reset(), promise: nil)
            armDeadline(context: context)
            if !keepAlive {
                done.futureResult.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
            }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

private extension ChannelHandlerContext {
    func writeAndFlushPromise() -> EventLoopPromise<Void> { eventLoop.makePromise(of: Void.self) }
}
