import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// A deliberately dumb TCP client for the server tests: writes exactly the bytes given (so malformed and
/// oversized requests can be sent) and collects whatever comes back until the server closes.
final class RawConnection: Sendable {
    private let channel: any Channel
    private let collector: Collector

    final class Collector: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let received = NIOLockedValueBox([UInt8]())
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let buffer = unwrapInboundIn(data)
            received.withLockedValue { $0 += buffer.readableBytesView }
        }
        func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
    }

    static let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)

    private init(channel: any Channel, collector: Collector) {
        self.channel = channel
        self.collector = collector
    }

    static func connect(port: Int, host: String = "127.0.0.1") async throws -> RawConnection {
        let loop = group.next()
        let collector = Collector()
        let channel = try await ClientBootstrap(group: loop)
            .channelInitializer { ch in ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(collector) } }
            .connect(host: host, port: port).get()
        return RawConnection(channel: channel, collector: collector)
    }

    func send(_ text: String) async throws {
        try await channel.writeAndFlush(channel.allocator.buffer(string: text))
    }

    /// Everything received so far, as text.
    var text: String { String(decoding: collector.received.withLockedValue { $0 }, as: UTF8.self) }

    /// The connection was closed by the server within `timeout` seconds.
    func closedWithin(_ timeout: Double) async -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if !channel.isActive { return true }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return !channel.isActive
    }

    func close() async { try? await channel.close() }
}

/// One HTTP exchange, parsed just enough: status code, headers (lower-cased names), body.
struct RawResponse {
    let status: Int
    let headers: [String: String]
    let body: String

    init?(_ text: String) {
        guard let split = text.range(of: "\r\n\r\n") else { return nil }
        let lines = text[..<split.lowerBound].components(separatedBy: "\r\n")
        let statusParts = lines[0].split(separator: " ")
        guard statusParts.count >= 2, let code = Int(statusParts[1]) else { return nil }
        status = code
        var h: [String: String] = [:]
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            h[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        headers = h
        body = String(text[split.upperBound...])
    }
}

/// `GET path` with `Connection: close`, read to the end.
func httpGet(port: Int, _ path: String, method: String = "GET", extraHeaders: String = "") async throws -> RawResponse {
    let c = try await RawConnection.connect(port: port)
    try await c.send("\(method) \(path) HTTP/1.1\r\nHost: localhost\r\n\(extraHeaders)Connection: close\r\n\r\n")
    _ = await c.closedWithin(10)
    let text = c.text
    await c.close()
    guard let r = RawResponse(text) else { throw HTTPTestError("unparseable response to \(method) \(path): \(text.debugDescription)") }
    return r
}

struct HTTPTestError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}
