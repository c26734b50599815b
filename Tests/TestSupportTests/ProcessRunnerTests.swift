import Foundation
import Testing
import TestSupport

/// The test harness runs thousands of child processes in one test process. A descriptor leaked per run
/// added up to 4,600 open pipes over the suite, and Foundation's Process.run() then crashed (SIGSEGV in
/// CI) while walking them; these tests keep the harness from leaking again.
@Suite struct ProcessRunnerTests {
    private func openDescriptors() throws -> Int {
        try FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count
    }

    @Test func runLeavesNoDescriptorsBehind() throws {
        _ = try Tools.runChecked("true", [])  // warm up whatever Foundation opens once
        let before = try openDescriptors()
        for i in 0..<40 {
            let r = try Tools.runChecked("sh", ["-c", "cat; echo err >&2"], input: "line \(i)\n")
            #expect(r.stdout == "line \(i)\n")
            #expect(r.stderr == "err\n")
        }
        let after = try openDescriptors()
        // Each leaking run left 2 to 3 descriptors; a few may belong to threads the runtime started.
        #expect(after - before < 8, "open descriptors went from \(before) to \(after) over 40 runs")
    }

    @Test func backgroundProcessesLeaveNoDescriptorsBehind() throws {
        let warm = try BackgroundProcess("sh", ["-c", "echo ready; exec sleep 30"], readyMarker: "ready")
        warm.stop()
        let before = try openDescriptors()
        for _ in 0..<20 {
            let p = try BackgroundProcess("sh", ["-c", "echo ready; exec sleep 30"], readyMarker: "ready")
            p.stop()
            // One that exits on its own is released too.
            let q = try BackgroundProcess("sh", ["-c", "echo ready"], readyMarker: "ready")
            q.stop()
        }
        let after = try openDescriptors()
        #expect(after - before < 8, "open descriptors went from \(before) to \(after) over 40 background processes")
    }

    @Test func lineProcessesAnswerLineByLineAndLeaveNoDescriptorsBehind() throws {
        let warm = try LineProcess("cat", [], name: "cat")
        warm.stop()
        let before = try openDescriptors()
        for i in 0..<20 {
            let p = try LineProcess("cat", [], name: "cat")
            try p.send("line \(i)")
            #expect(try p.readLine(timeout: 5) == "line \(i)")
            p.stop()
        }
        #expect(try openDescriptors() - before < 8)
        // A child that says nothing, and one that is gone, are errors, not hangs.
        let silent = try LineProcess("sleep", ["30"], name: "sleeper")
        #expect(throws: TestSupportError.self) { try silent.readLine(timeout: 0.2) }
        silent.stop()
        let gone = try LineProcess("true", [], name: "true")
        #expect(throws: TestSupportError.self) { try gone.readLine(timeout: 5) }
    }
}
