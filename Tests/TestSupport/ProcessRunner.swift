import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A failure inside a test helper; its description says what to look at.
public struct TestSupportError: Error, CustomStringConvertible, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// What a finished process did.
public struct ProcessResult: Sendable, CustomStringConvertible {
    public let command: [String]
    public let status: Int32
    public let stdout: String
    public let stderr: String
    public let timedOut: Bool

    public var succeeded: Bool { status == 0 && !timedOut }

    public var description: String {
        var s = "`\(command.joined(separator: " "))` exited \(status)\(timedOut ? " (timed out)" : "")"
        if !stderr.isEmpty { s += "\nstderr: \(stderr.prefix(4000))" }
        if !stdout.isEmpty { s += "\nstdout: \(stdout.prefix(4000))" }
        return s
    }
}

/// Finding and running external tools.
public enum Tools {
    /// System directories first (so that e.g. /usr/bin/python3 wins over shims), then $PATH.
    public static func locate(_ name: String) -> String? {
        if name.contains("/") { return FileManager.default.isExecutableFile(atPath: name) ? name : nil }
        let system = ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin", "/usr/local/bin"]
        let path = (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":").map(String.init)
        for dir in system + path {
            let candidate = dir + "/" + name
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }

    /// `locate`, or an error naming the tool.
    public static func require(_ name: String) throws -> String {
        guard let p = locate(name) else { throw TestSupportError("\(name) not found in the system directories or $PATH") }
        return p
    }

    /// Runs `executable` (a name is located first) with `arguments`, feeding `input` on stdin, capturing
    /// stdout and stderr. Kills the process after `timeout` seconds (then `timedOut` is true).
    public static func run(_ executable: String, _ arguments: [String], input: String? = nil,
                           timeout: Double = 60) throws -> ProcessResult {
        let path = try require(executable)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = arguments
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        let inPipe: Pipe? = input != nil ? Pipe() : nil
        p.standardInput = inPipe ?? FileHandle.nullDevice
        let finished = DispatchSemaphore(value: 0)
        p.terminationHandler = { _ in finished.signal() }
        try p.run()

        final class Collected: @unchecked Sendable { var out = Data(); var err = Data() }
        let collected = Collected()
        let group = DispatchGroup()
        let outHandle = out.fileHandleForReading, errHandle = err.fileHandleForReading
        DispatchQueue.global().async(group: group) { collected.out = outHandle.readDataToEndOfFile() }
        DispatchQueue.global().async(group: group) { collected.err = errHandle.readDataToEndOfFile() }
        if let inPipe, let input {
            let data = Data(input.utf8)
            let w = inPipe.fileHandleForWriting
            DispatchQueue.global().async(group: group) {
                try? w.write(contentsOf: data)
                try? w.close()
            }
        }
        var timedOut = false
        if finished.wait(timeout: .now() + timeout) == .timedOut {
            timedOut = true
            kill(p.processIdentifier, SIGKILL)
            finished.wait()
        }
        group.wait()
        // Foundation's Process keeps itself (and the pipes it holds) alive through its run-loop source
        // until waitUntilExit() runs; without these two steps every call left two pipe ends open, and
        // after some thousands of them Process.run() itself crashed while walking the open descriptors.
        try? outHandle.close()
        try? errHandle.close()
        p.waitUntilExit()
        return ProcessResult(command: [path] + arguments, status: p.terminationStatus,
                             stdout: String(decoding: collected.out, as: UTF8.self),
                             stderr: String(decoding: collected.err, as: UTF8.self), timedOut: timedOut)
    }

    /// `run`, throwing (with the whole result in the message) unless the process succeeded.
    @discardableResult
    public static func runChecked(_ executable: String, _ arguments: [String], input: String? = nil,
                                  timeout: Double = 60) throws -> ProcessResult {
        let r = try run(executable, arguments, input: input, timeout: timeout)
        guard r.succeeded else { throw TestSupportError("command failed: \(r)") }
        return r
    }
}

/// A long-running child process (e.g. a server); stopped by `stop()` or when released.
public final class BackgroundProcess: @unchecked Sendable {
    public let command: [String]
    private let process: Process
    private let lock = NSLock()
    private var stopped = false
    private let stderrHandle: FileHandle
    private let stdoutHandle: FileHandle

    /// Starts the command and waits until it prints a line containing `readyMarker` on stdout (if given).
    public init(_ executable: String, _ arguments: [String], readyMarker: String? = nil, readyTimeout: Double = 10) throws {
        let path = try Tools.require(executable)
        command = [path] + arguments
        process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        stderrHandle = err.fileHandleForReading
        stdoutHandle = out.fileHandleForReading
        try process.run()
        guard let marker = readyMarker else { return }
        let fd = out.fileHandleForReading.fileDescriptor
        var seen = Data()
        let deadline = Date().addingTimeInterval(readyTimeout)
        while !String(decoding: seen, as: UTF8.self).contains(marker) {
            let remaining = deadline.timeIntervalSinceNow
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let r = remaining > 0 ? poll(&pfd, 1, Int32(remaining * 1000)) : 0
            var chunk = [UInt8](repeating: 0, count: 4096)
            let n = r > 0 ? read(fd, &chunk, chunk.count) : 0
            if n <= 0 {
                if process.isRunning { kill(process.processIdentifier, SIGKILL) }
                let errText = String(decoding: stderrHandle.readDataToEndOfFile(), as: UTF8.self)
                stop()
                throw TestSupportError("\(command.joined(separator: " ")) did not become ready (\(r == 0 ? "timeout" : "exited")): \(errText)")
            }
            seen.append(contentsOf: chunk[0..<n])
        }
    }

    public var isRunning: Bool { process.isRunning }

    /// SIGKILL (children may inherit a blocked SIGTERM from the test runner's threads), then waits for the
    /// exit. Idempotent.
    public func stop() {
        lock.lock()
        defer { lock.unlock() }
        if stopped { return }
        stopped = true
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        // Also after an exit of its own: see `Tools.run` for why waitUntilExit() and the closes matter.
        process.waitUntilExit()
        try? stdoutHandle.close()
        try? stderrHandle.close()
    }

    deinit { stop() }
}

/// A child spoken to a line at a time over its stdin and stdout (a test's long-lived client that keeps one
/// connection or socket open). Stopped by `stop()` or when released; its pipes are closed with it.
public final class LineProcess: @unchecked Sendable {
    private let name: String
    private let process = Process()
    private let input: FileHandle
    private let output: FileHandle
    private var pending: [UInt8] = []
    private var stopped = false

    /// Starts `executable` (located first) with `arguments`; `name` says who it is in errors.
    public init(_ executable: String, _ arguments: [String], name: String) throws {
        self.name = name
        process.executableURL = URL(fileURLWithPath: try Tools.require(executable))
        process.arguments = arguments
        let inPipe = Pipe(), outPipe = Pipe()
        process.standardInput = inPipe
        process.standardOutput = outPipe
        process.standardError = FileHandle.nullDevice
        input = inPipe.fileHandleForWriting
        output = outPipe.fileHandleForReading
        try process.run()
    }

    /// Writes `line` and a newline to the child's stdin.
    public func send(_ line: String) throws {
        try input.write(contentsOf: Data((line + "\n").utf8))
    }

    /// The child's next line on stdout (without the newline); throws when none comes within `timeout`
    /// seconds or the child exits.
    public func readLine(timeout: Double) throws -> String {
        let deadline = Date().addingTimeInterval(timeout)
        let fd = output.fileDescriptor
        while true {
            if let nl = pending.firstIndex(of: 10) {
                let line = String(decoding: pending[..<nl], as: UTF8.self)
                pending.removeSubrange(...nl)
                return line
            }
            let left = deadline.timeIntervalSinceNow
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard left > 0, poll(&p, 1, Int32(left * 1000)) > 0 else { throw TestSupportError("\(name): no answer within \(timeout) s") }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let n = read(fd, &chunk, chunk.count)
            guard n > 0 else { throw TestSupportError("\(name) exited") }
            pending += chunk[0..<n]
        }
    }

    /// SIGKILL, then waits; releases the Process and its pipes (see `Tools.run`). Idempotent.
    public func stop() {
        if stopped { return }
        stopped = true
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        try? input.close()
        try? output.close()
    }

    deinit { stop() }
}
