import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// `scripts/fake-apiserver` for a test: a throwaway CA and server certificate (openssl), the server on
/// 127.0.0.1 serving list + watch over TLS, a kubeconfig for it, and a client for its control API (plain HTTP
/// on another loopback port: apply/delete objects, compact, drop watches, go down and up, inject failures).
/// Everything is removed by `with`, whatever happens.
public final class FakeKubeAPI: @unchecked Sendable {
    public let directory: URL
    public let kubeconfig: String
    public let token: String
    public private(set) var apiPort: Int
    public let controlPort: Int
    private let server: BackgroundProcess

    /// The package root (scripts/, examples/).
    public static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    public static func with<T>(data: String? = nil, _ body: (FakeKubeAPI) throws -> T) throws -> T {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("hnd-fakeapi-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let api = try FakeKubeAPI(directory: dir, data: data)
        defer { api.stop() }
        return try body(api)
    }

    private init(directory dir: URL, data: String?) throws {
        directory = dir
        let path = dir.path
        try TestCertificates.makeServer(in: path)
        token = "test-\(UUID().uuidString)"
        var args = [Self.root.appendingPathComponent("scripts/fake-apiserver").path,
                    "--cert", "\(path)/server.crt", "--key", "\(path)/server.key", "--token", token,
                    "--port-file", "\(path)/port", "--control-port-file", "\(path)/cport",
                    "--log", "\(path)/requests.log", "--bookmark-interval", "0.5"]
        if let data {
            try data.write(toFile: "\(path)/data.json", atomically: true, encoding: .utf8)
            args += ["--data", "\(path)/data.json"]
        }
        server = try BackgroundProcess("python3", args, readyMarker: "READY", readyTimeout: 60)
        func port(_ file: String) throws -> Int {
            guard let text = try? String(contentsOfFile: "\(path)/\(file)", encoding: .utf8),
                  let p = Int(text.trimmingCharacters(in: .whitespacesAndNewlines)) else {
                throw TestSupportError("fake-apiserver wrote no \(file)")
            }
            return p
        }
        apiPort = try port("port")
        controlPort = try port("cport")
        kubeconfig = "\(path)/kubeconfig"
        try """
            apiVersion: v1
            kind: Config
            current-context: fake
            clusters:
            - name: fake
              cluster:
                server: https://127.0.0.1:\(apiPort)
                certificate-authority: ca.crt
            users:
            - name: fake
              user:
                token: \(token)
            contexts:
            - name: fake
              context:
                cluster: fake
                user: fake
            """.write(toFile: kubeconfig, atomically: true, encoding: .utf8)
    }

    public func stop() { server.stop() }

    /// `env -i` with an empty HOME and only this kubeconfig: nothing from the test's environment leaks in.
    public var cleanEnvironment: [String] {
        ["env", "-i", "HOME=\(directory.path)", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
    }

    // MARK: control API

    /// Creates or replaces an object (JSON with kind and metadata); returns the server's commit time.
    @discardableResult
    public func apply(_ object: String) throws -> Double {
        try time(post("/apply", object))
    }

    @discardableResult
    public func delete(kind: String, namespace: String, name: String) throws -> Double {
        try time(post("/delete", #"{"kind":"\#(kind)","namespace":"\#(namespace)","name":"\#(name)"}"#))
    }

    private func time(_ answer: [String: Any]) throws -> Double {
        guard let t = answer["time"] as? Double else { throw TestSupportError("fake-apiserver answered \(answer)") }
        return t
    }

    /// POSTs to the control API and returns its JSON answer.
    @discardableResult
    public func post(_ path: String, _ body: String = "{}") throws -> [String: Any] {
        try request("POST", path, body)
    }

    public func get(_ path: String) throws -> [String: Any] { try request("GET", path, nil) }

    private func request(_ method: String, _ path: String, _ body: String?) throws -> [String: Any] {
        let (status, bodyText) = try LoopbackHTTP.request(port: controlPort, method, path, body: body)
        guard (200..<300).contains(status) else { throw TestSupportError("fake-apiserver control \(method) \(path): \(status) \(bodyText)") }
        guard let doc = try JSONSerialization.jsonObject(with: Data(bodyText.utf8)) as? [String: Any] else {
            throw TestSupportError("fake-apiserver control \(method) \(path): not a JSON object: \(bodyText)")
        }
        return doc
    }
}

/// A minimal HTTP/1.0 client for servers the tests run on 127.0.0.1 (the fake API's control port, the
/// agent's /metrics and /healthz), so tests need no HTTP library.
public enum LoopbackHTTP {
    public static func get(port: Int, _ path: String) throws -> (Int, String) { try request(port: port, "GET", path) }

    /// Returns the status code and the body.
    public static func request(port: Int, _ method: String, _ path: String, body: String? = nil) throws -> (Int, String) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw TestSupportError("socket: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var tv = timeval(tv_sec: 30, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = UInt16(port).bigEndian
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let ok = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
        guard ok else { throw TestSupportError("127.0.0.1:\(port): \(String(cString: strerror(errno)))") }
        let payload = Array((body ?? "").utf8)
        let head = "\(method) \(path) HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: \(payload.count)\r\n\r\n"
        let all = Array(head.utf8) + payload
        var sent = 0
        while sent < all.count {
            let n = all[sent...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
            guard n > 0 else { throw TestSupportError("127.0.0.1:\(port): send failed") }
            sent += n
        }
        var response = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = recv(fd, &chunk, chunk.count, 0)
            if n <= 0 { break }
            response += chunk[0..<n]
        }
        let text = String(decoding: response, as: UTF8.self)
        guard let split = text.range(of: "\r\n\r\n") else { throw TestSupportError("127.0.0.1:\(port): no answer to \(method) \(path)") }
        let status = text.split(separator: " ", maxSplits: 2).dropFirst().first.flatMap { Int($0) } ?? 0
        return (status, String(text[split.upperBound...]))
    }
}

/// A child process whose stderr goes to a file the test reads as it grows, with a real signal mask and
/// dispositions (spawned with an empty mask: the test runner's blocked signals are not inherited), so the
/// test can SIGTERM it as a kubelet would and see how it ends.
public final class LoggingProcess: @unchecked Sendable {
    public let pid: pid_t
    public let logPath: String
    private var exitStatus: Int32? = nil
    private let lock = NSLock()

    public init(_ command: [String], logPath: String) throws {
        self.logPath = logPath
        FileManager.default.createFile(atPath: logPath, contents: nil)
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, logPath + ".out", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_addopen(&actions, 2, logPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attr, &empty)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for s in [SIGTERM, SIGINT, SIGHUP, SIGPIPE] { sigaddset(&defaults, s) }
        posix_spawnattr_setsigdefault(&attr, &defaults)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        let path = try Tools.require(command[0])
        let argv = ([path] + command.dropFirst()).map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        var child: pid_t = 0
        let rc = posix_spawn(&child, path, &actions, &attr, argv, environ)
        guard rc == 0 else { throw TestSupportError("posix_spawn \(command[0]): \(String(cString: strerror(rc)))") }
        pid = child
    }

    /// Everything it wrote to stderr so far.
    public var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }
    public var lines: [String] { log.split(separator: "\n").map(String.init) }

    /// Waits until its stderr holds a line for which `match` is true (or it exits, or the time is up).
    @discardableResult
    public func waitForLine(timeout: Double = 30, after skip: Int = 0, _ match: (String) -> Bool) -> String? {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let line = lines.dropFirst(skip).first(where: match) { return line }
            if exited != nil { return lines.dropFirst(skip).first(where: match) }
            usleep(20_000)
        }
        return nil
    }

    /// The exit status once it has exited (a signal death is 128 + signal), else nil. Does not block.
    public var exited: Int32? {
        lock.lock(); defer { lock.unlock() }
        if let s = exitStatus { return s }
        var status: Int32 = 0
        let r = waitpid(pid, &status, WNOHANG)
        guard r == pid else { return nil }
        let code = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        exitStatus = code
        return code
    }

    /// Sends `signal` and waits up to `timeout` for the exit; nil when it did not exit.
    public func signal(_ signal: Int32, wait timeout: Double = 10) -> Int32? {
        kill(pid, signal)
        return waitForExit(timeout: timeout)
    }

    public func waitForExit(timeout: Double) -> Int32? {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let s = exited { return s }
            usleep(20_000)
        }
        return exited
    }

    /// SIGKILL if still running, and reap.
    public func stop() {
        if exited == nil {
            kill(pid, SIGKILL)
            _ = waitForExit(timeout: 10)
        }
    }

    deinit { stop() }
}

/// A throwaway CA and a server certificate for IP 127.0.0.1, made with openssl: `ca.crt`, `ca.key`,
/// `server.crt`, `server.key` in `path`.
public enum TestCertificates {
    public static func makeServer(in path: String) throws {
        func openssl(_ args: [String]) throws { try Tools.runChecked("openssl", args) }
        try openssl(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "\(path)/ca.key"])
        try openssl(["req", "-x509", "-new", "-key", "\(path)/ca.key", "-subj", "/CN=hostnet-dnat-test-ca",
                     "-days", "2", "-sha256", "-out", "\(path)/ca.crt"])
        try openssl(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "\(path)/server.key"])
        try openssl(["req", "-new", "-key", "\(path)/server.key", "-subj", "/CN=kube-apiserver", "-out", "\(path)/server.csr"])
        try "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n"
            .write(toFile: "\(path)/server.ext", atomically: true, encoding: .utf8)
        try openssl(["x509", "-req", "-in", "\(path)/server.csr", "-CA", "\(path)/ca.crt", "-CAkey", "\(path)/ca.key",
                     "-set_serial", "2", "-days", "2", "-sha256", "-extfile", "\(path)/server.ext", "-out", "\(path)/server.crt"])
    }
}
